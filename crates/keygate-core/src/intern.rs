//! Sharing equal immutable values: 100,000 cached keys of one integration
//! hold one scope set and one organization id between them, not 100,000
//! copies (about 130 bytes a key for a one-scope set).

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// Fewest values held before the interner first drops unused ones.
const FIRST_PURGE: usize = 1024;

/// Hands out one shared `Arc` per distinct value. A value no one else holds
/// any more is dropped when the set has doubled since the last purge, so
/// memory follows the distinct values in use, not every value ever seen.
/// Locked for a lookup and at most one allocation; never across an await.
pub struct Interner<T: ?Sized> {
    set: Mutex<Values<T>>,
}

struct Values<T: ?Sized> {
    held: HashSet<Arc<T>>,
    purge_at: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: Mutex::new(Values {
                held: HashSet::new(),
                purge_at: FIRST_PURGE,
            }),
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for Interner<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.set.lock().map_or(0, |v| v.held.len());
        f.debug_struct("Interner").field("held", &held).finish()
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T>
where
    for<'a> Arc<T>: From<&'a T>,
{
    /// The shared `Arc` equal to `value`, made on first sight.
    pub fn intern(&self, value: &T) -> Arc<T> {
        let mut values = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = values.held.get(value) {
            return Arc::clone(held);
        }
        if values.held.len() >= values.purge_at {
            // Only the set holds a count of 1, and every other handle is
            // cloned from one out of the set under this lock: none can
            // appear while it is checked.
            values.held.retain(|v| Arc::strong_count(v) > 1);
            values.purge_at = (values.held.len() * 2).max(FIRST_PURGE);
        }
        let shared: Arc<T> = Arc::from(value);
        values.held.insert(Arc::clone(&shared));
        shared
    }

    /// Distinct values held (some may be unused until the next purge).
    pub fn len(&self) -> usize {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .len()
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_allocation() {
        let interner = Interner::<str>::default();
        let a = interner.intern("org_a");
        let b = interner.intern(&String::from("org_a"));
        let c = interner.intern("org_b");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((&*a, &*c), ("org_a", "org_b"));
        assert_eq!(interner.len(), 2);
    }

    #[test]
    fn values_no_one_holds_are_dropped_and_held_ones_kept() {
        let interner = Interner::<str>::default();
        let kept = interner.intern("kept");
        for n in 0..FIRST_PURGE * 4 {
            drop(interner.intern(&format!("passing {n}")));
        }
        // Bounded by the purges, not by everything ever interned.
        assert!(interner.len() <= FIRST_PURGE + 1, "{}", interner.len());
        assert!(Arc::ptr_eq(&kept, &interner.intern("kept")));
    }
}
