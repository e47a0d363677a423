//! pprof's profile.proto, gzipped: what `go tool pprof`, Pyroscope and Parca
//! read. Field numbers are those of profile.proto in github.com/google/pprof.
//!
//! Sample types follow Go's heap profiles, so those tools show the familiar
//! names: alloc_objects/alloc_space (everything allocated since attach) and
//! inuse_objects/inuse_space (still outstanding), the default.

use std::{
    collections::HashMap,
    io::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use flate2::{write::GzEncoder, Compression};

use super::{
    folded::{frame_label, UNKNOWN_STACK},
    protobuf::Message,
};
use crate::report::{Report, ReportFrame, StackReport};

/// (type, unit) of each sample value, in the order `values` returns them.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

fn values(stack: &StackReport) -> [u64; 4] {
    [
        stack.total_allocations,
        stack.total_bytes,
        stack.allocations,
        stack.bytes,
    ]
}

/// The gzipped profile. `build_id` reads a module's GNU build id (hex), so
/// that symbol servers can find its debug info.
pub fn render(report: &Report, build_id: &dyn Fn(&str) -> Option<String>) -> Result<Vec<u8>> {
    let profile = encode(report, build_id, SystemTime::now());
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&profile).context("compressing the profile")?;
    gz.finish().context("compressing the profile")
}

/// The uncompressed profile.proto message.
pub fn encode(
    report: &Report,
    build_id: &dyn Fn(&str) -> Option<String>,
    now: SystemTime,
) -> Vec<u8> {
    let mut p = Profile::default();
    p.strings.get(""); // the string table starts with ""
    let mut samples = Vec::new();
    for stack in &report.stacks {
        let values = values(stack);
        if values == [0; 4] {
            continue;
        }
        let locations = p.stack_locations(stack);
        let mut label = Message::new();
        label
            .int(1, p.strings.get("stack_id"))
            .int(2, p.strings.get(&stack.stack_id));
        let mut sample = Message::new();
        sample
            .packed(1, locations)
            .packed(2, values)
            .message(3, &label);
        samples.push(sample);
    }

    let mut out = Message::new();
    for (kind, unit) in SAMPLE_TYPES {
        out.message(1, &p.value_type(kind, unit));
    }
    for sample in &samples {
        out.message(2, sample);
    }
    for (i, m) in p.mappings.iter().enumerate() {
        out.message(3, &m.encode(i as u64 + 1, &mut p.strings, build_id));
    }
    for location in &p.locations {
        out.message(4, location);
    }
    for function in &p.functions {
        out.message(5, function);
    }
    let duration_ns = (report.duration_s * 1e9) as i64;
    let now_ns = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    out.int(9, now_ns - duration_ns) // time_nanos: when tracing began
        .int(10, duration_ns)
        .message(11, &p.value_type("space", "bytes")) // period_type
        .int(12, 1); // period: every allocation is counted, none sampled
    for comment in comments(report) {
        out.int(13, p.strings.get(&comment));
    }
    out.int(14, p.strings.get("inuse_space")); // default_sample_type
    for s in &p.strings.list {
        out.bytes(6, s.as_bytes());
    }
    out.into_bytes()
}

fn comments(report: &Report) -> Vec<String> {
    let mut comments = vec![format!(
        "tracer: pid {} ({}), {:.1}s after attach: {} bytes in {} allocations outstanding",
        report.pid,
        report.command,
        report.duration_s,
        report.totals.bytes,
        report.totals.allocations
    )];
    if report.dropped.any() {
        comments.push(format!(
            "some allocations were not tracked, totals are lower bounds: {:?}",
            report.dropped
        ));
    }
    comments
}

#[derive(Default)]
struct Strings {
    list: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.list.len() as i64;
        self.list.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// One module's addresses. The report keeps no mapping ranges, so the range
/// is that of the addresses seen and the file offset is unknown (0). Frames
/// come symbolized, so readers need not map addresses back into files.
struct Mapping {
    file: String,
    start: u64,
    end: u64,
    has_files: bool,
    has_lines: bool,
}

impl Mapping {
    fn encode(
        &self,
        id: u64,
        strings: &mut Strings,
        build_id: &dyn Fn(&str) -> Option<String>,
    ) -> Message {
        let mut m = Message::new();
        m.uint(1, id)
            .uint(2, self.start)
            .uint(3, self.end + 1)
            .int(5, strings.get(&self.file))
            .int(6, build_id(&self.file).map_or(0, |b| strings.get(&b)))
            .uint(7, 1) // has_functions: names are in the profile
            .uint(8, self.has_files as u64)
            .uint(9, self.has_lines as u64)
            .uint(10, 1); // has_inline_frames: inlined calls are their own lines
        m
    }
}

#[derive(Default)]
struct Profile {
    strings: Strings,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<String, u64>,
    functions: Vec<Message>,
    function_ids: HashMap<(String, String), u64>,
    locations: Vec<Message>,
    location_ids: HashMap<(Option<String>, String), u64>,
}

impl Profile {
    fn value_type(&mut self, kind: &str, unit: &str) -> Message {
        let mut m = Message::new();
        m.int(1, self.strings.get(kind))
            .int(2, self.strings.get(unit));
        m
    }

    /// Location ids of a stack, leaf first. A location is one address: the
    /// frames inlined at it and the function they were inlined into.
    fn stack_locations(&mut self, stack: &StackReport) -> Vec<u64> {
        if stack.frames.is_empty() {
            let unknown = ReportFrame {
                function: Some(UNKNOWN_STACK.to_string()),
                file: None,
                line: None,
                module: None,
                address: "0x0".to_string(),
                inlined: false,
                wraps_allocator: false,
            };
            return vec![self.location(&[unknown])];
        }
        let mut ids = Vec::new();
        let mut start = 0;
        for (i, frame) in stack.frames.iter().enumerate() {
            if !frame.inlined || i + 1 == stack.frames.len() {
                ids.push(self.location(&stack.frames[start..=i]));
                start = i + 1;
            }
        }
        ids
    }

    /// `frames`: inlined frames, innermost first, then their caller; all at
    /// one address.
    fn location(&mut self, frames: &[ReportFrame]) -> u64 {
        let last = &frames[frames.len() - 1];
        let key = (last.module.clone(), last.address.clone());
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let address = parse_address(&last.address);
        let mapping = last
            .module
            .as_deref()
            .map_or(0, |module| self.mapping(module, address, frames));
        let id = self.locations.len() as u64 + 1;
        let mut location = Message::new();
        location.uint(1, id).uint(2, mapping).uint(3, address);
        for frame in frames {
            let mut line = Message::new();
            line.uint(1, self.function(frame))
                .int(2, frame.line.map_or(0, i64::from));
            location.message(4, &line);
        }
        self.locations.push(location);
        self.location_ids.insert(key, id);
        id
    }

    fn mapping(&mut self, module: &str, address: u64, frames: &[ReportFrame]) -> u64 {
        let id = *self
            .mapping_ids
            .entry(module.to_string())
            .or_insert_with(|| {
                self.mappings.push(Mapping {
                    file: module.to_string(),
                    start: address,
                    end: address,
                    has_files: false,
                    has_lines: false,
                });
                self.mappings.len() as u64
            });
        let m = &mut self.mappings[id as usize - 1];
        m.start = m.start.min(address);
        m.end = m.end.max(address);
        m.has_files |= frames.iter().any(|f| f.file.is_some());
        m.has_lines |= frames.iter().any(|f| f.line.is_some());
        id
    }

    fn function(&mut self, frame: &ReportFrame) -> u64 {
        let name = frame_label(frame);
        let file = frame.file.clone().unwrap_or_default();
        let key = (name, file);
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.strings.get(&key.0);
        let mut function = Message::new();
        function
            .uint(1, id)
            .int(2, name)
            .int(3, name) // system_name: the names are already demangled
            .int(4, self.strings.get(&key.1));
        self.functions.push(function);
        self.function_ids.insert(key, id);
        id
    }
}

fn parse_address(text: &str) -> u64 {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::folded::tests::sample_report;

    /// Reads back the varint and length-delimited fields of a message:
    /// (field, value or bytes).
    fn fields(mut data: &[u8]) -> Vec<(u64, Result<u64, Vec<u8>>)> {
        let mut out = Vec::new();
        let varint = |data: &mut &[u8]| {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let b = data[0];
                *data = &data[1..];
                v |= u64::from(b & 0x7f) << shift;
                if b < 0x80 {
                    break;
                }
            }
            v
        };
        while !data.is_empty() {
            let key = varint(&mut data);
            match key & 7 {
                0 => out.push((key >> 3, Ok(varint(&mut data)))),
                2 => {
                    let len = varint(&mut data) as usize;
                    out.push((key >> 3, Err(data[..len].to_vec())));
                    data = &data[len..];
                }
                other => panic!("wire type {other}"),
            }
        }
        out
    }

    /// The sample report with one address per function, as real stacks have.
    fn report() -> Report {
        let mut report = sample_report();
        for frame in report.stacks.iter_mut().flat_map(|s| s.frames.iter_mut()) {
            let n = frame
                .function
                .as_deref()
                .map_or(0, |f| f.len() + f.as_bytes()[0] as usize);
            frame.address = format!("{:#x}", 0x1000 + n);
        }
        report
    }

    #[test]
    fn profile_has_go_heap_sample_types_strings_and_one_sample_per_stack() {
        let report = report();
        let data = encode(&report, &|m| Some(format!("id-of-{m}")), UNIX_EPOCH);
        let top = fields(&data);
        let strings: Vec<String> = top
            .iter()
            .filter(|(f, _)| *f == 6)
            .map(|(_, v)| String::from_utf8(v.clone().unwrap_err()).unwrap())
            .collect();
        assert_eq!(strings[0], "");
        for s in [
            "inuse_space",
            "alloc_objects",
            "bytes",
            "leak",
            "main",
            "id-of-/usr/bin/app",
        ] {
            assert!(strings.iter().any(|x| x == s), "{s} in {strings:?}");
        }
        let count = |field| top.iter().filter(|(f, _)| *f == field).count();
        assert_eq!(count(1), 4, "sample types");
        assert_eq!(count(2), 3, "the stack with nothing allocated is left out");
        assert_eq!(count(3), 1, "one module");
        // Both leak;main stacks share their two locations; the unnamed
        // frame and a;b have one each.
        assert_eq!(count(4), 4);
        assert_eq!(count(5), 4, "functions");
        let sample = fields(
            top.iter()
                .find(|(f, _)| *f == 2)
                .unwrap()
                .1
                .as_ref()
                .unwrap_err(),
        );
        let values = sample
            .iter()
            .find(|(f, _)| *f == 2)
            .unwrap()
            .1
            .as_ref()
            .unwrap_err();
        // alloc_objects 4, alloc_space 1000, inuse_objects 4, inuse_space 1000
        assert_eq!(values, &[4, 0xe8, 0x07, 4, 0xe8, 0x07]);
        let default = top
            .iter()
            .find(|(f, _)| *f == 14)
            .unwrap()
            .1
            .clone()
            .unwrap();
        assert_eq!(strings[default as usize], "inuse_space");
    }

    #[test]
    fn inlined_frames_share_a_location_leaf_first() {
        let mut report = report();
        let mut inlined = report.stacks[0].frames[0].clone();
        inlined.function = Some("inner".into());
        inlined.inlined = true;
        report.stacks[0].frames.insert(0, inlined);
        let mut p = Profile::default();
        let ids = p.stack_locations(&report.stacks[0]);
        assert_eq!(ids.len(), 2, "inner+leak at one address, then main");
        let location = fields(p.locations[0].as_bytes());
        let lines: Vec<_> = location.iter().filter(|(f, _)| *f == 4).collect();
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn output_is_gzip() {
        let gz = render(&report(), &|_| None).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }
}
