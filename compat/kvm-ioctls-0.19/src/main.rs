//! The compat VMM on kvm-ioctls 0.19: see `compat/common/vmm.rs`.

#[path = "../../common/vmm.rs"]
mod vmm;

fn main() -> std::process::ExitCode {
    vmm::main("0.19")
}
