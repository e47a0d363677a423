//! The rule on the real code of Debian 12's redis-server 7.0.15
//! (testdata/wrappers: one file per function, `name@address.bin`, its whole
//! body; `plt@address.bin`, its PLT sections; `symbols.txt`, the functions
//! these call; `slots.txt`, the GOT slots of the allocator and a few
//! others).

use super::*;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/target/testdata/wrappers");

fn redis() -> Object {
    let dir = format!("{TESTDATA}/redis-7.0.15");
    let mut code = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            let (_, address) = stem.split_once('@').unwrap();
            let address = u64::from_str_radix(address, 16).unwrap();
            code.push((address, std::fs::read(&path).unwrap()));
        }
    }
    let lines = |file: &str| {
        std::fs::read_to_string(format!("{dir}/{file}"))
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    let functions = lines("symbols.txt")
        .into_iter()
        .map(|f| {
            let address = u64::from_str_radix(&f[0], 16).unwrap();
            (address, f[1].parse().unwrap(), f[2].clone())
        })
        .collect();
    let slots = lines("slots.txt")
        .into_iter()
        .map(|f| (u64::from_str_radix(&f[0], 16).unwrap(), f[1].clone()))
        .collect();
    Object::new(ElfInfo::default(), code, functions, slots)
}

fn judged(object: &mut Object, name: &str) -> bool {
    let (start, size, _) = object
        .functions
        .iter()
        .find(|(_, _, n)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .clone();
    // Any address inside the body names the function.
    object.judge_containing(start + size / 2) && object.judge(start, size, 0)
}

#[test]
fn functions_that_pass_a_size_to_the_allocator_are_wrappers() {
    let mut redis = redis();
    for name in [
        // A tail call to zmalloc (a listed wrapper).
        "RM_Alloc",
        "sds_malloc",
        // Calls ztrymalloc_usable with its own size.
        "ztrymalloc",
        // zmalloc(sizeof(*zn) + level * sizeof(struct zskiplistLevel)).
        "zslCreateNode",
        "lpNew",
    ] {
        assert!(judged(&mut redis, name), "{name}");
    }
}

#[test]
fn real_code_is_not_a_wrapper() {
    let mut redis = redis();
    for (name, why) in [
        // Its out-of-memory handler is called through a pointer.
        ("zmalloc", "a call through a pointer that is not a GOT slot"),
        // extend_to_usable is neither the allocator nor a wrapper.
        ("ztrymalloc_usable", "a call to another function"),
        ("listCreate", "a constant size: zmalloc(sizeof(*list))"),
        ("sdsfree", "only frees"),
        (
            "loadingAbsProgress",
            "zmalloc_used_memory only reads a counter",
        ),
        ("createStringObject", "calls code"),
        ("extend_to_usable", "calls nothing"),
    ] {
        assert!(!judged(&mut redis, name), "{name}: {why}");
    }
}

#[test]
fn constant_sizes_are_seen_at_the_call() {
    let redis = redis();
    let (start, size) = (0x61a00, 51);
    let code = redis.code_at(start, size).unwrap();
    let exits = placement::exits(code, start).unwrap();
    assert!(!exits.indirect);
    assert_eq!(
        exits.transfers,
        [placement::Transfer {
            to: Destination::Direct(0x7bb30),
            constant: [true, false, false],
        }]
    );
    let zmalloc = redis.code_at(0x7bb30, 101).unwrap();
    let exits = placement::exits(zmalloc, 0x7bb30).unwrap();
    // `mov $8,%edi; cmovne %rbx,%rdi`: not a constant at malloc@plt.
    assert_eq!(exits.transfers[0].to, Destination::Direct(0x601c8));
    assert_eq!(exits.transfers[0].constant, [false; 3]);
    // The out-of-memory handler: a pointer in .data, no GOT slot of the
    // allocator's.
    assert_eq!(exits.transfers[2].to, Destination::Slot(0x1ee6e8));
}

#[test]
fn functions_are_found_by_any_address_inside_and_nothing_outside() {
    let redis = redis();
    assert_eq!(redis.containing(0x61a00), Some((0x61a00, 51)));
    assert_eq!(redis.containing(0x61a32), Some((0x61a00, 51)));
    assert_eq!(redis.containing(0x61a33), None);
    assert_eq!(redis.containing(0x10), None);
}

/// Lists the functions of $WRAPPERS_SCAN judged wrappers (a tool to pick
/// test cases and check the rule on real objects, not a test).
#[test]
#[ignore]
fn scan() {
    let path = std::env::var("WRAPPERS_SCAN").unwrap();
    let mut object = Object::read(Path::new(&path)).unwrap();
    let all: Vec<(u64, u64, String)> = object.functions.clone();
    for (start, size, name) in all {
        if object.judge(start, size, 0) {
            println!("{name} {start:#x} {size}");
        }
    }
}
