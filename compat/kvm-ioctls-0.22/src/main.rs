//! The compat VMM on kvm-ioctls 0.22: see `compat/common/vmm.rs`.

#[path = "../../common/vmm.rs"]
mod vmm;

fn main() -> std::process::ExitCode {
    vmm::main("0.22")
}
