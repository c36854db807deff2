//! The dirty ring (being written): KVM's per-vCPU ring of dirtied guest frames, both halves.
