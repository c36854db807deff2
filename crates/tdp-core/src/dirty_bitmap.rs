//! The dirty bitmap (being written): KVM's per-memslot dirty log.
