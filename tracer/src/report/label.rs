//! One-line labels for stacks: the first frame past allocation wrappers
//! (`xmalloc`, `g_malloc`, `zmalloc`, `operator new`, Rust's `alloc::`
//! layers...), so rows name the code that wanted the memory, not the
//! wrapper every stack goes through. Wrappers are a built-in list, user
//! patterns (`--wrapper`, `--no-wrapper`, like pprof's -drop_frames and
//! -show_frames), and functions the data shows to be wrappers: the
//! innermost frame of stacks with many different callers, and functions
//! whose code only calls the allocator (`target::wrappers`, marked on the
//! frames by the symbolizer). Full stacks are
//! never changed, only the label chosen from them. Pure.

use std::collections::{HashMap, HashSet};

use regex::Regex;

use crate::symbolize::Frame;

/// Functions that only pass an allocation on, matched against demangled
/// names from their start.
const BUILTIN: &[&str] = &[
    // The allocator's own entry points, when one calls another.
    r"^(__libc_)?(malloc|calloc|realloc|reallocarray|memalign|posix_memalign|aligned_alloc|valloc|pvalloc)$",
    // C libraries.
    r"^_*(strn?dup|wcsdup|v?asprintf|open_memstream)$",
    r"^x(malloc|calloc|zalloc|realloc|reallocarray|strn?dup|memdup|nmalloc|2nrealloc|2realloc|charalloc)$",
    r"^g_(try_)?(malloc|malloc0|realloc|new|new0|renew|memdup2?|strn?dup|strdup_printf|slice_alloc0?|slice_copy)(_n)?$",
    // Redis and Valkey (not `zmalloc_used_memory` and the like: `wrappers`
    // asks this list of what a function calls).
    r"^z(try)?(malloc|calloc|realloc|strdup)(_usable|_num|_no_tcache)?(_internal)?$",
    r"^(palloc0?|palloc_extended|repalloc|pstrdup|pnstrdup|MemoryContextAlloc\w*)$",
    r"^(PyMem|PyObject)_(Raw)?(Malloc|Calloc|Realloc)$",
    // C++.
    r"^operator new",
    r"^(std::(__new_allocator|allocator|allocator_traits)|__gnu_cxx::new_allocator)\b",
    r"^std::_Vector_base<.*>::_M_allocate",
    r"^std::(__cxx11::)?basic_string<.*>::_M_(create|construct)",
    // Rust.
    r"^(__rust_|__rdl_|__rg_)(alloc|alloc_zeroed|realloc)$",
    r"^<?alloc::",
    r"^<?std::alloc::",
    r"RawVec(Inner)?<",
];

/// A function that is the innermost frame of stacks with at least this
/// many different callers is a wrapper.
pub const MANY_CALLERS: usize = 4;

/// Picks each stack's label; built once per run, fed stacks as they come.
#[derive(Clone, Debug)]
pub struct Labeler {
    builtin: Vec<Regex>,
    added: Vec<Regex>,
    removed: Vec<Regex>,
    /// Callers seen of each innermost function, up to `MANY_CALLERS`.
    callers: HashMap<String, HashSet<String>>,
}

impl Default for Labeler {
    fn default() -> Self {
        Labeler::new(Vec::new(), Vec::new())
    }
}

impl Labeler {
    /// `added`: more wrappers (`--wrapper`); `removed`: never wrappers
    /// (`--no-wrapper`), whatever the list or the data say.
    pub fn new(added: Vec<Regex>, removed: Vec<Regex>) -> Self {
        Labeler {
            builtin: BUILTIN
                .iter()
                .map(|p| Regex::new(p).expect("built-in wrapper pattern"))
                .collect(),
            added,
            removed,
            callers: HashMap::new(),
        }
    }

    /// Learns from one stack (function names, innermost first): the
    /// callers of its innermost function.
    pub fn observe<'a>(&mut self, functions: impl IntoIterator<Item = Option<&'a str>>) {
        let mut functions = functions.into_iter();
        let (Some(Some(inner)), Some(Some(caller))) = (functions.next(), functions.next()) else {
            return;
        };
        let callers = self.callers.entry(inner.to_string()).or_default();
        if callers.len() < MANY_CALLERS {
            callers.insert(caller.to_string());
        }
    }

    pub fn is_wrapper(&self, function: &str) -> bool {
        if self.removed.iter().any(|r| r.is_match(function)) {
            return false;
        }
        self.added.iter().any(|r| r.is_match(function))
            || self.builtin.iter().any(|r| r.is_match(function))
            || self
                .callers
                .get(function)
                .is_some_and(|c| c.len() >= MANY_CALLERS)
    }

    /// Index of the frame to label a stack with: the first one past the
    /// wrappers (unknown functions are not wrappers); 0 if all are.
    pub fn pick<'a>(&self, functions: impl IntoIterator<Item = Option<&'a str>>) -> usize {
        self.pick_marked(functions.into_iter().map(|f| (f, false)))
    }

    /// `pick` on symbolized frames: those whose code only calls the
    /// allocator (`Frame::wraps_allocator`) are wrappers too.
    pub fn pick_frames(&self, frames: &[Frame]) -> usize {
        self.pick_marked(
            frames
                .iter()
                .map(|f| (f.function.as_deref(), f.wraps_allocator)),
        )
    }

    /// `pick` on (function, whose code only calls the allocator).
    pub fn pick_marked<'a>(
        &self,
        functions: impl IntoIterator<Item = (Option<&'a str>, bool)>,
    ) -> usize {
        for (i, (function, wraps)) in functions.into_iter().enumerate() {
            match function {
                Some(f) if self.is_wrapper(f) => continue,
                Some(f) if wraps && !self.removed.iter().any(|r| r.is_match(f)) => continue,
                _ => return i,
            }
        }
        0
    }
}

/// Whether the built-in list names `function` (`wrappers` asks it of the
/// functions a candidate calls, by their symbol names).
pub fn is_listed(function: &str) -> bool {
    static LIST: std::sync::LazyLock<Vec<Regex>> = std::sync::LazyLock::new(|| {
        BUILTIN
            .iter()
            .map(|p| Regex::new(p).expect("built-in wrapper pattern"))
            .collect()
    });
    LIST.iter().any(|r| r.is_match(function))
}

/// Parses a `--wrapper`/`--no-wrapper` pattern.
pub fn parse_pattern(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(labeler: &Labeler, stack: &[&str]) -> usize {
        labeler.pick(stack.iter().map(|f| Some(*f)))
    }

    #[test]
    fn well_known_wrappers_are_skipped() {
        let l = Labeler::default();
        for (stack, want) in [
            (
                &["zmalloc_usable", "zmalloc", "createStringObject", "main"][..],
                2,
            ),
            (&["xmalloc", "read_config", "main"], 1),
            (&["zcalloc_num", "hdr_init", "call"], 1),
            (&["g_malloc0", "g_type_create_instance", "main"], 1),
            (
                &["operator new(unsigned long)", "Cache::insert(int)", "main"],
                1,
            ),
            (&["palloc", "ExecInitNode", "main"], 1),
            (&["strdup", "parse_name", "main"], 1),
            (
                &[
                    "alloc::raw_vec::RawVecInner<A>::reserve::do_reserve_and_handle",
                    "alloc::raw_vec::RawVec<T,A>::grow_one",
                    "alloc::vec::Vec<T,A>::push",
                    "leaky::keep",
                    "leaky::main",
                ],
                3,
            ),
            (
                &[
                    "std::__new_allocator<int>::allocate(unsigned long, void const*)",
                    "fill",
                ],
                1,
            ),
            (&["leak_steadily", "main"], 0),
            (&["xmalloc", "xstrdup"], 0),
        ] {
            assert_eq!(pick(&l, stack), want, "{stack:?}");
        }
    }

    #[test]
    fn unknown_frames_stop_the_skip() {
        let l = Labeler::default();
        assert_eq!(l.pick([Some("xmalloc"), None, Some("main")]), 1);
    }

    #[test]
    fn users_add_and_remove_patterns() {
        let l = Labeler::new(
            vec![parse_pattern("^my_alloc$").unwrap()],
            vec![parse_pattern("^xmalloc$").unwrap()],
        );
        assert_eq!(pick(&l, &["my_alloc", "handler"]), 1);
        assert_eq!(
            pick(&l, &["xmalloc", "handler"]),
            0,
            "removed by --no-wrapper"
        );
        assert!(parse_pattern("(").is_err());
    }

    #[test]
    fn a_function_with_many_callers_is_a_wrapper() {
        let mut l = Labeler::default();
        for caller in ["parse", "load", "serve"] {
            l.observe([Some("obj_alloc"), Some(caller), Some("main")]);
        }
        assert_eq!(
            pick(&l, &["obj_alloc", "parse"]),
            0,
            "three callers: not yet"
        );
        l.observe([Some("obj_alloc"), Some("reply"), Some("main")]);
        assert_eq!(pick(&l, &["obj_alloc", "parse"]), 1);
        // Many stacks, one caller: the function is the code itself.
        let mut one = Labeler::default();
        for _ in 0..10 {
            one.observe([Some("make_node"), Some("build_tree")]);
        }
        assert_eq!(pick(&one, &["make_node", "build_tree"]), 0);
        let no_wrapper = Labeler::new(Vec::new(), vec![parse_pattern("obj_alloc").unwrap()]);
        let mut no_wrapper = no_wrapper;
        for caller in ["a", "b", "c", "d"] {
            no_wrapper.observe([Some("obj_alloc"), Some(caller)]);
        }
        assert_eq!(pick(&no_wrapper, &["obj_alloc", "a"]), 0);
    }

    #[test]
    fn functions_whose_code_only_calls_the_allocator_are_skipped() {
        let l = Labeler::default();
        let stack = [
            (Some("grab_buffer"), true),
            (Some("load_config"), false),
            (Some("main"), false),
        ];
        assert_eq!(l.pick_marked(stack), 1);
        // Only from the innermost frame on: a marked frame further out is
        // the label when the code before it is not a wrapper.
        assert_eq!(
            l.pick_marked([(Some("parse"), false), (Some("grab"), true)]),
            0
        );
        let kept = Labeler::new(Vec::new(), vec![parse_pattern("^grab_buffer$").unwrap()]);
        assert_eq!(kept.pick_marked(stack), 0, "--no-wrapper wins");
    }
}
