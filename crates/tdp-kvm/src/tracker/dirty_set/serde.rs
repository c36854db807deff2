//! `serde` for the dirty sets (feature `serde`), so unsent dirty state outlives the process: a slot's set
//! is written as its runs of contiguous pages (compact for both sparse and dense sets), and read back
//! through [`SlotDirty::from_runs`], which refuses runs that are not the slot's pages.
//!
//! Keeps: I5 (deserialized data is hostile: validated, with bounded memory) and I4 (a round trip keeps
//! every page).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tdp_core::addr::{Gpa, RingSlot};

use super::{DirtySets, SlotDirty};

#[derive(Serialize, Deserialize)]
struct SlotDirtyRepr {
    /// `as_id << 16 | id`.
    slot: u32,
    guest_base: u64,
    pages: u64,
    /// `(first page, pages)`, ascending.
    runs: Vec<(u64, u64)>,
}

impl Serialize for SlotDirty {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SlotDirtyRepr {
            slot: self.slot.raw(),
            guest_base: self.guest_base.0,
            pages: self.pages,
            runs: self.page_runs().collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SlotDirty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = SlotDirtyRepr::deserialize(d)?;
        SlotDirty::from_runs(RingSlot::from_raw(r.slot), Gpa(r.guest_base), r.pages, &r.runs)
            .map_err(D::Error::custom)
    }
}

impl Serialize for DirtySets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.slots.values())
    }
}

impl<'de> Deserialize<'de> for DirtySets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = DirtySets::default();
        for set in Vec::<SlotDirty>::deserialize(d)? {
            let key = set.slot().raw();
            if out.slots.insert(key, set).is_some() {
                return Err(D::Error::custom(format!("memslot {key:#x} appears twice")));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};

    use crate::{DirtyEpochs, DirtySets};

    #[test]
    fn i4_dirty_sets_and_epochs_survive_a_round_trip_and_i5_bad_input_is_refused() {
        let (a, b) = (RingSlot::new(AsId(0), SlotId(1)), RingSlot::new(AsId(1), SlotId(1)));
        let mut sets = DirtySets::default();
        sets.add_slot(a, Gpa(0x10_0000), 1000);
        sets.add_slot(b, Gpa(0), 100);
        (0..900).filter(|p| p % 3 != 0).for_each(|p| {
            sets.insert(a, p); // dense
        });
        sets.insert(b, 99);
        let json = serde_json::to_string(&sets).unwrap();
        let back: DirtySets = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sets);
        let mut epochs = DirtyEpochs::new();
        epochs.record(&sets);
        epochs.checkpoint();
        epochs.record(&back);
        let again: DirtyEpochs = serde_json::from_str(&serde_json::to_string(&epochs).unwrap()).unwrap();
        assert_eq!(again, epochs);
        assert_eq!(again.since(0).unwrap(), sets);

        for (bad, why) in [
            (r#"[{"slot":1,"guest_base":0,"pages":10,"runs":[[9,2]]}]"#, "past the slot"),
            (r#"[{"slot":1,"guest_base":0,"pages":10,"runs":[[5,1],[5,1]]}]"#, "overlapping"),
            (r#"[{"slot":1,"guest_base":0,"pages":10,"runs":[[5,0]]}]"#, "empty run"),
            (
                r#"[{"slot":1,"guest_base":0,"pages":18446744073709551615,"runs":[[0,18446744073709551615]]}]"#,
                "huge slot",
            ),
            (
                r#"[{"slot":1,"guest_base":0,"pages":10,"runs":[]},{"slot":1,"guest_base":0,"pages":10,"runs":[]}]"#,
                "twice",
            ),
        ] {
            assert!(serde_json::from_str::<DirtySets>(bad).is_err(), "accepted {why}");
        }
    }
}
