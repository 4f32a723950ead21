//! Each VM's shared counter table as the supervisor keeps it: made before the VM's first
//! spawn (a failure is logged and the VM runs without one), checked before every spawn,
//! and replaced by a fresh one when a child left it corrupted. None of this ever stops a
//! start: a VM without a table runs, it only exports no per-vCPU counters.

use crate::metrics::counters::SharedTable;

use super::EventLog;

/// A new sealed table for VM `name`; a failure is logged, not returned.
pub(super) fn create(name: &str, log: &EventLog) -> Option<SharedTable> {
    match SharedTable::create(name) {
        Ok(t) => Some(t),
        Err(e) => {
            log.vm(
                4,
                name,
                &format!("cannot create its counter table ({e}); it runs without exit counters"),
            );
            None
        }
    }
}

/// Before spawning a child with `vcpus` vCPUs: check what the last child left in the
/// table and replace a corrupted table (logged once, at this replacement), or try again
/// to make one the VM lacks. The exporter's high-water marks carry the counts over.
pub(super) fn prepare(name: &str, vcpus: usize, table: &mut Option<SharedTable>, log: &EventLog) {
    match table {
        Some(t) => {
            if let Err(why) = t.check() {
                log.vm(
                    4,
                    name,
                    &format!("counter table corrupted ({why}); replaced by a fresh one"),
                );
                *table = create(name, log);
            }
        }
        None => *table = create(name, log),
    }
    if let Some(t) = table {
        t.handing_to(vcpus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_keeps_a_clean_table_replaces_a_corrupted_one_and_makes_a_missing_one() {
        let log = EventLog::default();
        let mut table = create("t", &log);
        let id = |t: &Option<SharedTable>| t.as_ref().map(|t| t.counters().id());
        let first = id(&table);
        assert!(first.is_some());
        prepare("t", 2, &mut table, &log);
        assert_eq!(id(&table), first, "a clean table is kept");
        // What a child with 2 vCPUs may not write: a header of 255.
        table.as_ref().unwrap().counters().set_vcpus(255);
        assert!(table.as_ref().unwrap().check().is_err());
        prepare("t", 2, &mut table, &log);
        let second = id(&table);
        assert!(
            second.is_some() && second != first,
            "a corrupted table is replaced"
        );
        assert_eq!(table.as_ref().unwrap().check(), Ok(()));
        let mut none = None;
        prepare("t", 1, &mut none, &log);
        assert!(
            none.is_some(),
            "a VM without a table gets one at its next start"
        );
    }
}
