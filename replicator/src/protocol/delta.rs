//! Page deltas: a page given as the words that changed since a version of
//! it both sides hold, instead of its 4096 bytes.
//!
//! A delta is a run of pieces `[unchanged words: LEB128][changed words:
//! LEB128][the changed words' new bytes]`, words of 8 bytes; what follows
//! the last piece is unchanged. A page the guest changed in a few places
//! (a counter, a list link, a timer) shrinks from 4096 bytes to a few
//! dozen, and with it what the primary seals and the standby opens per
//! page: the cost of an epoch on a link or a CPU that carries bytes slowly
//! (AES-GCM runs at ~21 MB/s in a lab node under nested emulation).
//!
//! The encoder compares whole words (a byte changed costs its word) and
//! gives up past a limit: a page that changed much goes whole. The decoder
//! checks every bound before it writes: a delta that is cut short, runs
//! past the page, or has a piece with no changed word is refused and
//! nothing of it is applied.
//!
//! This module is the codec; [`super::page_deltas`] carries deltas in
//! epochs, and the primary's delta cache keeps the version of each page
//! that the standby's replica holds.

use super::PAGE_SIZE;

const WORD: usize = 8;
const WORDS: usize = PAGE_SIZE / WORD;
/// The encoder skips unchanged runs of this many words with one
/// comparison of their bytes (a `memcmp`, vectorised) before it looks at
/// single words.
const BLOCK_WORDS: usize = 8;

/// Why a delta was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("a count is cut short or longer than a page's words need")]
    BadCount,
    #[error("a piece changes no word")]
    EmptyPiece,
    #[error("a piece runs past the page (to word {end} of {WORDS})")]
    PastPage { end: usize },
    #[error("a piece's new bytes are cut short")]
    ShortBytes,
}

fn word(page: &[u8], index: usize) -> u64 {
    let at = index * WORD;
    u64::from_ne_bytes(page[at..at + WORD].try_into().expect("a word"))
}

fn put_count(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A count of words: at most 2 bytes (a page has 512 words); a longer
/// form, or one past a page's words, is refused.
fn take_count(delta: &[u8], at: &mut usize) -> Result<usize, DeltaError> {
    let mut n = 0usize;
    for shift in [0, 7] {
        let byte = *delta.get(*at).ok_or(DeltaError::BadCount)?;
        *at += 1;
        n |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return if n <= WORDS {
                Ok(n)
            } else {
                Err(DeltaError::BadCount)
            };
        }
    }
    Err(DeltaError::BadCount)
}

/// Appends to `out` the delta that turns `old` into `new` (both one page)
/// and returns its length, or returns `None` (and leaves `out` as it was)
/// once it would be longer than `limit` bytes: the page then goes whole.
/// An unchanged page gives an empty delta.
pub fn encode(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> Option<usize> {
    assert_eq!(old.len(), PAGE_SIZE, "a delta is of one page");
    assert_eq!(new.len(), PAGE_SIZE, "a delta is of one page");
    let start = out.len();
    // Most pages a harvest reports again and again (hot pages) did not
    // change at all.
    if old == new {
        return Some(0);
    }
    let block = |i: usize| i * WORD..(i + BLOCK_WORDS) * WORD;
    let mut i = 0;
    let mut unchanged_from = 0;
    while i < WORDS {
        if i % BLOCK_WORDS == 0 && old[block(i)] == new[block(i)] {
            i += BLOCK_WORDS;
            continue;
        }
        if word(old, i) == word(new, i) {
            i += 1;
            continue;
        }
        let first = i;
        // A page that changed in most of its words (a dense page against
        // zeros) gives up here, before its run is copied.
        let room = limit.saturating_sub(out.len() - start);
        while i < WORDS && word(old, i) != word(new, i) {
            i += 1;
            if (i - first) * WORD > room {
                out.truncate(start);
                return None;
            }
        }
        put_count(out, first - unchanged_from);
        put_count(out, i - first);
        out.extend_from_slice(&new[first * WORD..i * WORD]);
        unchanged_from = i;
        if out.len() - start > limit {
            out.truncate(start);
            return None;
        }
    }
    Some(out.len() - start)
}

/// Checks `delta` whole (what [`apply`] checks before it writes).
pub fn check(delta: &[u8]) -> Result<(), DeltaError> {
    for_each_piece(delta, |_, _| {})
}

/// Applies `delta` to `page` (one page, the version the delta was made
/// against). Checks the whole delta before it writes a byte: a refused
/// delta leaves the page as it was.
pub fn apply(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    assert_eq!(page.len(), PAGE_SIZE, "a delta is of one page");
    check(delta)?;
    for_each_piece(delta, |first, bytes| {
        page[first * WORD..first * WORD + bytes.len()].copy_from_slice(bytes)
    })
}

/// Calls `piece(first changed word, its new bytes)` for each piece, in
/// order, once the piece is checked.
fn for_each_piece(delta: &[u8], mut piece: impl FnMut(usize, &[u8])) -> Result<(), DeltaError> {
    let (mut at, mut word_at) = (0, 0);
    while at < delta.len() {
        let unchanged = take_count(delta, &mut at)?;
        let changed = take_count(delta, &mut at)?;
        if changed == 0 {
            return Err(DeltaError::EmptyPiece);
        }
        let first = word_at + unchanged;
        let end = first + changed;
        if end > WORDS {
            return Err(DeltaError::PastPage { end });
        }
        let bytes = delta
            .get(at..at + changed * WORD)
            .ok_or(DeltaError::ShortBytes)?;
        piece(first, bytes);
        at += bytes.len();
        word_at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut delta = Vec::new();
        let len = encode(old, new, 2 * PAGE_SIZE, &mut delta).expect("within twice a page");
        assert_eq!(len, delta.len());
        let mut applied = old.to_vec();
        apply(&mut applied, &delta).expect("applies");
        assert_eq!(applied, new, "the delta turns the old page into the new");
        len
    }

    #[test]
    fn a_few_changed_words_give_a_short_delta_that_applies() {
        let old = page(0x11);
        assert_eq!(round_trip(&old, &old), 0, "unchanged: empty");
        let mut new = old.clone();
        new[0] = 1; // the first word
        new[4095] = 2; // the last word
        new[8 * 100..8 * 103].fill(3); // three words in the middle
        assert_eq!(
            round_trip(&old, &new),
            (2 + 8) + (2 + 3 * 8) + (3 + 8),
            "each piece: its counts (a skip of 408 words takes 2 bytes) and its words"
        );
        let everything = page(0x22);
        assert_eq!(round_trip(&old, &everything), 1 + 2 + PAGE_SIZE);
    }

    /// The encoder word by word, without skipping blocks: what the fast
    /// one must give, byte for byte.
    fn encode_word_by_word(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut i, mut unchanged_from) = (0, 0);
        while i < WORDS {
            if word(old, i) == word(new, i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < WORDS && word(old, i) != word(new, i) {
                i += 1;
            }
            put_count(&mut out, first - unchanged_from);
            put_count(&mut out, i - first);
            out.extend_from_slice(&new[first * WORD..i * WORD]);
            unchanged_from = i;
        }
        out
    }

    #[test]
    fn skipping_unchanged_blocks_gives_the_word_by_word_delta() {
        let old: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..500 {
            let mut new = old.clone();
            // 1 to 12 changed runs of 1 to 20 words, anywhere: across block
            // edges, at the page's ends, next to each other.
            for _ in 0..=round % 12 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = (x % WORDS as u64) as usize;
                let len = 1 + (x >> 20) as usize % 20;
                for w in first..(first + len).min(WORDS) {
                    new[w * WORD + (x >> 40) as usize % WORD] ^= 0x5a;
                }
            }
            let mut delta = Vec::new();
            encode(&old, &new, 2 * PAGE_SIZE, &mut delta).expect("within the limit");
            assert_eq!(delta, encode_word_by_word(&old, &new), "round {round}");
            let mut applied = old.clone();
            apply(&mut applied, &delta).expect("applies");
            assert_eq!(applied, new, "round {round}");
        }
    }

    #[test]
    fn a_delta_past_the_limit_is_given_up_and_leaves_the_output_alone() {
        let old = page(0);
        let mut new = old.clone();
        for w in (0..WORDS).step_by(2) {
            new[w * WORD] = 1;
        }
        let mut out = vec![9, 9];
        assert_eq!(encode(&old, &new, 1024, &mut out), None);
        assert_eq!(out, [9, 9]);
        assert!(encode(&old, &new, PAGE_SIZE * 2, &mut out).is_some());
    }

    #[test]
    fn bad_deltas_are_refused_and_change_nothing() {
        let old = page(0x33);
        let mut new = old.clone();
        new[8 * 10] = 7;
        new[8 * 20] = 8;
        let mut delta = Vec::new();
        encode(&old, &new, PAGE_SIZE, &mut delta).unwrap();
        // Every cut of the delta but the whole and the first piece's end.
        let first_piece = 1 + 1 + 8;
        for cut in 1..delta.len() {
            let mut target = old.clone();
            let result = apply(&mut target, &delta[..cut]);
            if cut == first_piece {
                assert!(result.is_ok(), "a whole first piece is a delta too");
                continue;
            }
            assert!(result.is_err(), "cut at {cut} of {}", delta.len());
            assert_eq!(target, old, "nothing applied from a refused delta");
        }
        let mut target = old.clone();
        for (bad, why) in [
            (vec![0, 0], DeltaError::EmptyPiece),
            (vec![0x80, 0x04, 1], DeltaError::PastPage { end: 513 }),
            (vec![0x81, 0x04, 0], DeltaError::BadCount),
            (vec![0x80, 0x80, 0x01, 1], DeltaError::BadCount),
            (vec![0xff], DeltaError::BadCount),
            (vec![0, 2, 1, 2, 3], DeltaError::ShortBytes),
        ] {
            assert_eq!(apply(&mut target, &bad), Err(why), "{bad:?}");
        }
        // A later piece that is bad keeps the good one before it out too.
        let mut two = delta[..first_piece].to_vec();
        two.extend_from_slice(&[0xff, 0x7f]);
        assert_eq!(apply(&mut target, &two), Err(DeltaError::BadCount));
        assert_eq!(target, old);
    }

    #[test]
    fn random_pages_round_trip() {
        // xorshift: the same pages on every run.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let old: Vec<u8> = (0..PAGE_SIZE).map(|_| next() as u8).collect();
            let mut new = old.clone();
            for _ in 0..(next() % 64) {
                let at = (next() as usize) % PAGE_SIZE;
                let len = ((next() as usize) % 64).min(PAGE_SIZE - at);
                new[at..at + len].iter_mut().for_each(|b| *b = next() as u8);
            }
            round_trip(&old, &new);
        }
    }
}
