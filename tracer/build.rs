//! Builds the eBPF programs (`tracer-ebpf`, nightly, bpfel target) and puts
//! the object in OUT_DIR, where `probes.rs` embeds it with `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
