//! Memorable job ids like Cedana's (`famous_hopper7`: an adjective, an underscore, the surname of a
//! scientist or engineer, one digit) and random checkpoint ids shaped like UUIDs.
//!
//! The randomness comes from std alone: each draw hashes the clock, the process id and a counter with a
//! freshly keyed [`RandomState`] (whose keys the standard library seeds from the OS) and mixes the result.
//! Good enough for names; not for secrets.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use super::store::{JobStore, StoreError};

/// The adjectives a job id starts with.
#[rustfmt::skip]
pub const ADJECTIVES: &[&str] = &[
    "admiring", "adoring", "affectionate", "amazing", "awesome", "blissful", "bold", "brave", "charming",
    "clever", "compassionate", "confident", "cool", "dazzling", "determined", "dreamy", "eager", "ecstatic",
    "elegant", "eloquent", "epic", "famous", "fervent", "festive", "focused", "friendly", "gallant", "gifted",
    "gracious", "happy", "hopeful", "inspiring", "jolly", "jovial", "keen", "kind", "laughing", "lucid",
    "magical", "modest", "nifty", "optimistic", "peaceful", "practical", "quirky", "relaxed", "serene",
    "sharp", "stoic", "sweet", "tender", "upbeat", "vibrant", "vigilant", "wizardly", "wonderful", "zealous",
];

/// The surnames of scientists and engineers a job id ends with (before its digit).
#[rustfmt::skip]
pub const SURNAMES: &[&str] = &[
    "allen", "babbage", "bartik", "bohr", "boole", "cerf", "curie", "darwin", "dijkstra", "dirac", "einstein",
    "engelbart", "euler", "faraday", "fermi", "feynman", "franklin", "galileo", "gauss", "goldberg", "hamilton",
    "hawking", "hodgkin", "hoare", "hopper", "hypatia", "johnson", "kahn", "kepler", "knuth", "lamport",
    "liskov", "lovelace", "maxwell", "mccarthy", "meitner", "mendel", "newton", "noether", "pascal", "perlman",
    "planck", "ramanujan", "riemann", "ritchie", "sagan", "shannon", "tesla", "thompson", "torvalds", "turing",
    "wozniak", "yalow",
];

/// How many ids of the usual shape [`unique_jid`] tries before it lengthens the number.
const SHORT_ATTEMPTS: usize = 64;
/// How many longer ids it tries after that before giving up.
const LONG_ATTEMPTS: usize = 64;

/// A random job id: `adjective_surnameD`, e.g. `famous_hopper7` (about 30,000 of them). It may be taken:
/// see [`unique_jid`].
pub fn random_jid() -> String {
    let r = random_u64();
    let adjective = ADJECTIVES[(r % ADJECTIVES.len() as u64) as usize];
    let surname = SURNAMES[((r >> 16) % SURNAMES.len() as u64) as usize];
    let digit = (r >> 32) % 10;
    format!("{adjective}_{surname}{digit}")
}

/// A random job id not in `store` when it was looked at. Tries ids of the usual shape first and, should many
/// of those be taken, ones with a longer number (`famous_hopper4821`).
///
/// Another writer may take the same id between this check and the caller's insert; the insert then fails
/// with [`StoreError::JobExists`] and the caller can simply ask again.
pub fn unique_jid(store: &JobStore) -> Result<String, StoreError> {
    for attempt in 0..SHORT_ATTEMPTS + LONG_ATTEMPTS {
        let mut jid = random_jid();
        if attempt >= SHORT_ATTEMPTS {
            jid.push_str(&(random_u64() % 100_000).to_string());
        }
        if !store.contains(&jid)? {
            return Ok(jid);
        }
    }
    Err(StoreError::NoFreeJid { attempts: SHORT_ATTEMPTS + LONG_ATTEMPTS })
}

/// A random id shaped like a version-4 UUID (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`, lowercase hex), for
/// checkpoints.
pub fn checkpoint_id() -> String {
    let hi = random_u64();
    let lo = random_u64();
    let hi = (hi & !0xf000) | 0x4000; // version 4
    let lo = (lo & !(0xc000_u64 << 48)) | (0x8000_u64 << 48); // variant 10xx
    format!("{:08x}-{:04x}-{:04x}-{:04x}-{:012x}", hi >> 32, (hi >> 16) & 0xffff, hi & 0xffff, lo >> 48, lo & 0xffff_ffff_ffff)
}

/// 64 random bits: a freshly keyed SipHash of the time, the process and a counter, then SplitMix64's
/// finaliser.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut z = h.finish().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{Job, JobKind};
    use std::collections::HashSet;

    /// `adjective_surnameD` with the words from our lists and exactly one digit.
    fn check_shape(jid: &str) {
        let (adjective, rest) = jid.split_once('_').unwrap_or_else(|| panic!("no underscore in {jid:?}"));
        assert!(!rest.contains('_'), "{jid:?}");
        assert!(ADJECTIVES.contains(&adjective), "{jid:?}: unknown adjective");
        let (surname, digit) = rest.split_at(rest.len() - 1);
        assert!(digit.bytes().all(|b| b.is_ascii_digit()), "{jid:?}: does not end in a digit");
        assert!(SURNAMES.contains(&surname), "{jid:?}: unknown surname");
        assert!(surname.bytes().all(|b| b.is_ascii_lowercase()), "{jid:?}");
    }

    #[test]
    fn random_jid_has_the_shape() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let jid = random_jid();
            check_shape(&jid);
            seen.insert(jid);
        }
        // 1,000 draws out of ~28,000 names: a handful of repeats at most, never a stuck generator.
        assert!(seen.len() > 900, "only {} distinct ids in 1000", seen.len());
    }

    #[test]
    fn word_lists_are_clean() {
        for list in [ADJECTIVES, SURNAMES] {
            assert!(list.len() >= 50);
            let distinct: HashSet<_> = list.iter().collect();
            assert_eq!(distinct.len(), list.len(), "duplicates");
            for w in list {
                assert!(!w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()), "{w:?}");
            }
        }
    }

    #[test]
    fn checkpoint_id_is_uuid_shaped() {
        let id = checkpoint_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{id}");
        assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        assert!(parts[2].starts_with('4'), "{id}");
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'), "{id}");
        assert_ne!(checkpoint_id(), checkpoint_id());
    }

    #[test]
    fn unique_jid_skips_taken_ids() {
        let store = JobStore::open_in_memory().unwrap();
        for _ in 0..200 {
            let jid = unique_jid(&store).unwrap();
            check_shape(&jid);
            store.insert(&Job::new(jid, JobKind::Process, 1, vec![])).unwrap();
        }
        assert_eq!(store.list().unwrap().len(), 200);
    }
}
