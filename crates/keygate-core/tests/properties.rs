//! The fuzz targets' invariants, on proptest's input.
//!
//! The invariants live with the fuzz targets, in fuzz/src/, and are included
//! here as they are: each property builds the same `Input` from random bytes
//! with `arbitrary`, as a fuzz target builds it from libFuzzer's, and runs
//! the same `check`, so `cargo test` checks on stable, in a bounded number
//! of cases, what the fuzzers check for hours on nightly. The seed corpus
//! (fuzz/corpus/) runs too: an input a fuzzer found, saved there, stays a
//! regression test.

#[path = "../../../fuzz/src/lib.rs"]
mod invariants;

use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;

/// Cases per property: the six together take a few seconds in a debug build.
const CASES: u32 = 512;

/// A fuzz input: structured bytes and a text, joined as the targets split them.
fn input() -> impl Strategy<Value = Vec<u8>> {
    (vec(any::<u8>(), 0..4096), vec(any::<char>(), 0..96)).prop_map(|(structured, text)| {
        invariants::join(&structured, &text.into_iter().collect::<String>())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn token(data in input()) {
        invariants::token::run(&data);
    }

    #[test]
    fn scope(data in input()) {
        invariants::scope::run(&data);
    }

    #[test]
    fn policy(data in input()) {
        invariants::policy::run(&data);
    }

    #[test]
    fn cidr(data in input()) {
        invariants::cidr::run(&data);
    }

    #[test]
    fn page(data in input()) {
        invariants::page::run(&data);
    }

    #[test]
    fn decision(data in input()) {
        invariants::decision::run(&data);
    }
}

/// A fuzz target: its name (its corpus directory) and its `run`.
type Target = (&'static str, fn(&[u8]));

#[test]
fn seed_corpus_keeps_every_invariant() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let targets: [Target; 6] = [
        ("token", invariants::token::run),
        ("scope", invariants::scope::run),
        ("policy", invariants::policy::run),
        ("cidr", invariants::cidr::run),
        ("page", invariants::page::run),
        ("decision", invariants::decision::run),
    ];
    for (target, run) in targets {
        let mut seeds = 0;
        for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            seeds += 1;
        }
        assert!(seeds > 0, "{target} has a seed corpus");
    }
}

#[test]
fn split_undoes_join() {
    let data = invariants::join(&[1, 2, 3], "kg_live_x");
    assert_eq!(invariants::split(&data), (&[1, 2, 3][..], "kg_live_x"));
    assert_eq!(invariants::split(&[0, 0, b'a']), (&[][..], "a"));
    assert_eq!(invariants::split(&[7]), (&[7][..], ""));
}
