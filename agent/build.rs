//! Embeds the kernel programs. `cargo xtask build-ebpf` (run by every xtask command)
//! builds them with nightly into target/ebpf; `PORTCULLIS_EBPF_OBJECT` overrides the path.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=PORTCULLIS_EBPF_OBJECT");
    let path = match std::env::var_os("PORTCULLIS_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/portcullis-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        println!(
            "cargo::error=the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (`cargo xtask test` and `cargo xtask demo` do it for you)",
            path.display()
        );
        return;
    }
    println!(
        "cargo:rustc-env=PORTCULLIS_EBPF_OBJECT_PATH={}",
        path.display()
    );
}
