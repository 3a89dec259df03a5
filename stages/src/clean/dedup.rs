//! Exact and near-duplicate removal.
//!
//! Exact: a 128-bit hash of the normalised text. Near: MinHash signatures of word shingles,
//! banded for locality-sensitive hashing. Signatures are computed in parallel, but documents are
//! admitted one by one in corpus order, and the first of a cluster is the one kept, so the kept
//! set does not depend on the thread count. Memory per kept document is one hash per band, not its
//! text.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::params::{Bounded, Bounds, Share};

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupParams {
    /// Drop documents whose normalised text equals an earlier one.
    #[serde(default = "yes")]
    pub exact: bool,
    /// Drop near-duplicates (MinHash-LSH).
    #[serde(default)]
    pub minhash: Option<MinHashParams>,
}

impl Default for DedupParams {
    fn default() -> Self {
        DedupParams {
            exact: true,
            minhash: None,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MinHashParams {
    /// Estimated Jaccard similarity of word shingles above which documents count as duplicates.
    pub threshold: Share,
    /// Words per shingle.
    pub shingle: NonZeroUsize,
    /// Hash functions per signature (1 to 4096); split into bands × rows for the given threshold.
    pub permutations: Bounded<usize, Permutations>,
    pub seed: u64,
}

/// How many hash functions a MinHash signature may have.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Permutations;
impl Bounds for Permutations {
    const LOW: Option<(f64, bool)> = Some((1.0, false));
    const HIGH: Option<(f64, bool)> = Some((4096.0, false));
}

impl Default for MinHashParams {
    fn default() -> Self {
        MinHashParams {
            threshold: Share::of(0.8),
            shingle: NonZeroUsize::new(5).expect("not zero"),
            permutations: Bounded::of(112),
            seed: 1,
        }
    }
}

/// A document's MinHash signature.
pub type Signature = Vec<u32>;

/// Mersenne prime 2^61 - 1: the universal hash family `(a·x + b) mod p`.
const PRIME: u64 = (1 << 61) - 1;

pub struct MinHasher {
    shingle: usize,
    coefficients: Vec<(u64, u64)>,
    bands: usize,
    rows: usize,
}

impl MinHasher {
    pub fn new(params: &MinHashParams) -> Self {
        let permutations = params.permutations.get();
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let coefficients = (0..permutations)
            .map(|_| (rng.random_range(1..PRIME), rng.random_range(0..PRIME)))
            .collect();
        let (bands, rows) = optimal_bands(params.threshold.get(), permutations);
        MinHasher {
            shingle: params.shingle.get(),
            coefficients,
            bands,
            rows,
        }
    }

    /// The signature of a text: per hash function, the minimum over its shingles. Words are
    /// compared lowercased, and punctuation separates words, so `Lord,` and `lord` are the
    /// same word and `o'er` is two (as datatrove does: more words per edit, better recall).
    /// `None` for a text without words: such documents are not near-duplicates of each other.
    pub fn signature(&self, text: &str) -> Option<Signature> {
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        if words.is_empty() {
            return None;
        }
        let mut shingles: Vec<u64> = if words.len() < self.shingle {
            vec![xxhash_rust::xxh3::xxh3_64(words.join(" ").as_bytes())]
        } else {
            words
                .windows(self.shingle)
                .map(|w| xxhash_rust::xxh3::xxh3_64(w.join(" ").as_bytes()))
                .collect()
        };
        shingles.sort_unstable();
        shingles.dedup();
        let signature = self
            .coefficients
            .iter()
            .map(|&(a, b)| {
                shingles
                    .iter()
                    .map(|&x| {
                        ((a as u128 * (x % PRIME) as u128 + b as u128) % PRIME as u128) as u32
                    })
                    .min()
                    .unwrap_or(u32::MAX)
            })
            .collect();
        Some(signature)
    }

    fn band_keys<'a>(&'a self, signature: &'a Signature) -> impl Iterator<Item = u64> + 'a {
        let rows = self.rows;
        (0..self.bands).map(move |band| {
            let slice = &signature[band * rows..(band + 1) * rows];
            let bytes: Vec<u8> = slice.iter().flat_map(|v| v.to_le_bytes()).collect();
            xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, band as u64)
        })
    }
}

/// Bands × rows such that a pair with similarity `threshold` is caught with probability at least
/// 0.9, with the fewest false positives below the threshold, preferring splits that use all the
/// permutations (for 0.8 and 112: 14 bands of 8, datatrove's default). Falls back to the most
/// sensitive split.
pub fn optimal_bands(threshold: f64, permutations: usize) -> (usize, usize) {
    let caught =
        |bands: usize, rows: usize, s: f64| 1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32);
    let false_positives = |bands: usize, rows: usize| {
        let steps = 200;
        let h = threshold / steps as f64;
        (0..steps)
            .map(|i| caught(bands, rows, (i as f64 + 0.5) * h))
            .sum::<f64>()
            * h
    };
    let splits: Vec<(usize, usize)> = (1..=permutations)
        .flat_map(|b| (1..=permutations / b).map(move |r| (b, r)))
        .collect();
    // Splits that use every hash computed come first; then any split.
    let exact = splits.iter().filter(|&&(b, r)| b * r == permutations);
    let sensitive = |candidates: &mut dyn Iterator<Item = &(usize, usize)>| {
        candidates
            .filter(|&&(b, r)| caught(b, r, threshold) >= 0.9)
            .min_by(|x, y| false_positives(x.0, x.1).total_cmp(&false_positives(y.0, y.1)))
            .copied()
    };
    sensitive(&mut exact.into_iter())
        .or_else(|| sensitive(&mut splits.iter()))
        .or_else(|| {
            splits
                .iter()
                .copied()
                .max_by(|x, y| caught(x.0, x.1, threshold).total_cmp(&caught(y.0, y.1, threshold)))
        })
        .unwrap_or((1, 1))
}

/// The hash exact dedup compares (computed by the parallel workers).
#[derive(Clone, Copy, Debug)]
pub struct ExactHash(u128);

impl ExactHash {
    pub fn of(text: &str) -> Self {
        ExactHash(xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }
}

/// Why a document is a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Duplicate {
    Exact,
    Near,
}

/// The documents admitted so far.
pub struct Index {
    exact: Option<HashSet<u128>>,
    near: Option<(MinHasher, Vec<HashMap<u64, u32>>)>,
    /// Representative → how many near-duplicates it absorbed.
    pub clusters: HashMap<u32, u32>,
    admitted: u32,
}

impl Index {
    pub fn new(params: &DedupParams) -> Self {
        let near = match &params.minhash {
            Some(p) => {
                let hasher = MinHasher::new(p);
                let tables = vec![HashMap::new(); hasher.bands];
                Some((hasher, tables))
            }
            None => None,
        };
        Index {
            exact: params.exact.then(HashSet::new),
            near,
            clusters: HashMap::new(),
            admitted: 0,
        }
    }

    pub fn hasher(&self) -> Option<&MinHasher> {
        self.near.as_ref().map(|(h, _)| h)
    }

    /// Admits a document (in corpus order) unless it duplicates an admitted one.
    pub fn admit(
        &mut self,
        exact: ExactHash,
        signature: Option<&Signature>,
    ) -> Result<(), Duplicate> {
        if let Some(seen) = &mut self.exact {
            if !seen.insert(exact.0) {
                return Err(Duplicate::Exact);
            }
        }
        if let (Some((hasher, tables)), Some(signature)) = (&mut self.near, signature) {
            let keys: Vec<u64> = hasher.band_keys(signature).collect();
            if let Some(rep) = keys
                .iter()
                .zip(tables.iter())
                .find_map(|(k, t)| t.get(k).copied())
            {
                *self.clusters.entry(rep).or_default() += 1;
                return Err(Duplicate::Near);
            }
            for (key, table) in keys.into_iter().zip(tables.iter_mut()) {
                table.insert(key, self.admitted);
            }
        }
        self.admitted += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u64, words: usize) -> String {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..words)
            .map(|_| format!("w{}", rng.random_range(0..5000)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `base` with `k` words replaced.
    fn edited(base: &str, k: usize, seed: u64) -> String {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut words: Vec<String> = base.split(' ').map(String::from).collect();
        for _ in 0..k {
            let i = rng.random_range(0..words.len());
            words[i] = format!("x{}", rng.random_range(0..1_000_000));
        }
        words.join(" ")
    }

    #[test]
    fn bands_suit_the_threshold() {
        assert_eq!(optimal_bands(0.8, 112), (14, 8));
        let (b, r) = optimal_bands(0.5, 64);
        assert!(b * r <= 64 && 1.0 - (1.0 - 0.5f64.powi(r as i32)).powi(b as i32) >= 0.9);
    }

    #[test]
    fn near_duplicates_are_found_and_distinct_texts_kept() {
        let params = DedupParams {
            exact: true,
            minhash: Some(MinHashParams::default()),
        };
        let mut index = Index::new(&params);
        let hasher = MinHasher::new(params.minhash.as_ref().unwrap());
        let originals: Vec<String> = (0..200).map(|i| text(i, 100)).collect();
        for t in &originals {
            assert_eq!(
                index.admit(ExactHash::of(t), hasher.signature(t).as_ref()),
                Ok(()),
                "distinct texts are kept"
            );
        }
        let mut caught = 0;
        for (i, t) in originals.iter().enumerate() {
            let copy = edited(t, 2, i as u64);
            if index.admit(ExactHash::of(&copy), hasher.signature(&copy).as_ref())
                == Err(Duplicate::Near)
            {
                caught += 1;
            }
        }
        assert!(
            caught >= 175,
            "caught {caught} of 200 copies with 2 words changed in 100"
        );
        assert_eq!(
            index.admit(ExactHash::of(&originals[3]), None),
            Err(Duplicate::Exact)
        );
    }

    #[test]
    fn signatures_are_deterministic_and_seeded() {
        let a = MinHasher::new(&MinHashParams::default());
        let b = MinHasher::new(&MinHashParams::default());
        let t = text(1, 50);
        assert_eq!(a.signature(&t), b.signature(&t));
        assert_eq!(a.signature("... !!"), None, "no words, no signature");
        let c = MinHasher::new(&MinHashParams {
            seed: 2,
            ..Default::default()
        });
        assert_ne!(a.signature(&t), c.signature(&t));
    }

    #[test]
    fn shingles_ignore_case_and_split_words_at_punctuation() {
        let h = MinHasher::new(&MinHashParams::default());
        let plain = "o er the hill and far away my lord the king is come";
        let marked = "O'er the hill, and far away -- my Lord! The king is come...";
        assert_eq!(h.signature(plain), h.signature(marked));
        assert_ne!(
            h.signature(plain),
            h.signature("oer the hill and far away my lord the king is come")
        );
    }
}
