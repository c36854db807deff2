//! Links the kernel binary with `examples/bochs-hv/linker.ld` (load address 1 MiB, multiboot2 header
//! first): both kernels have the same layout.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rustc-link-arg-bins=-T{dir}/../bochs-hv/linker.ld");
    println!("cargo:rerun-if-changed=../bochs-hv/linker.ld");
}
