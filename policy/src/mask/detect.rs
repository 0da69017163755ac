//! The built-in content detectors: hand-written scanners over bytes, so they also work on text
//! in a single-byte client encoding, and need no regular expression engine on the hot path.
//!
//! Each scanner reports the byte ranges it finds. All of them require digit boundaries (a match
//! never starts or ends inside a longer run of digits) and validate a checksum or the ranges
//! that are actually issued, so that order numbers, timestamps and other long numbers are left
//! alone.

use std::ops::Range;

/// The byte at `index`, or 0 (never a digit, letter or separator) outside the text.
fn at(text: &[u8], index: usize) -> u8 {
    text.get(index).copied().unwrap_or(0)
}

/// The first position at or after `from` whose byte satisfies `wanted`.
fn next(text: &[u8], from: usize, wanted: impl Fn(u8) -> bool) -> Option<usize> {
    let offset = text.get(from..)?.iter().position(|&byte| wanted(byte))?;
    Some(from.saturating_add(offset))
}

/// The byte `back` positions before `index`, or 0 before the start.
fn before(text: &[u8], index: usize, back: usize) -> u8 {
    index.checked_sub(back).map_or(0, |i| at(text, i))
}

fn digit(byte: u8) -> bool {
    byte.is_ascii_digit()
}

/// Whether the text just before `start` is a digit, or one of `joiners` after a digit: the
/// start of a match would continue a longer number.
fn number_before(text: &[u8], start: usize, joiners: &[u8]) -> bool {
    let previous = before(text, start, 1);
    digit(previous) || (joiners.contains(&previous) && digit(before(text, start, 2)))
}

/// Whether the text at `end` is a digit, or one of `joiners` before a digit.
fn number_after(text: &[u8], end: usize, joiners: &[u8]) -> bool {
    let next = at(text, end);
    digit(next) || (joiners.contains(&next) && digit(at(text, end.saturating_add(1))))
}

fn value(byte: u8) -> u32 {
    u32::from(byte.wrapping_sub(b'0'))
}

/// Payment card numbers: 13 to 19 digits, contiguous or in groups separated by one space or
/// one dash (the same separator throughout), that pass the Luhn check. Guard: the Luhn check
/// (nine in ten random numbers fail it), and groups are never split, so a card number is not
/// found inside a longer number. Where a run of groups is longer than a card, the longest
/// valid sequence of whole groups from the earliest group is taken.
pub(crate) fn card_numbers(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    const MIN: usize = 13;
    const MAX: usize = 19;
    let mut groups: Vec<Group> = Vec::new();
    let mut from = 0;
    while let Some(i) = next(text, from, digit) {
        // Most runs of digits are too short for a card: measure before collecting groups.
        let mut j = i;
        let mut digits = 0;
        loop {
            let start = j;
            while digit(at(text, j)) {
                j = j.saturating_add(1);
            }
            digits += j - start;
            if matches!(at(text, j), b' ' | b'-') && digit(at(text, j.saturating_add(1))) {
                j = j.saturating_add(1);
            } else {
                break;
            }
        }
        from = j;
        if digits < MIN {
            continue;
        }
        groups.clear();
        let mut j = i;
        loop {
            let start = j;
            while digit(at(text, j)) {
                j = j.saturating_add(1);
            }
            let separator = at(text, j);
            let joined = matches!(separator, b' ' | b'-') && digit(at(text, j.saturating_add(1)));
            groups.push(Group {
                start,
                end: j,
                separator: if joined { separator } else { 0 },
            });
            if !joined {
                break;
            }
            j = j.saturating_add(1);
        }
        let mut first = 0;
        while first < groups.len() {
            let mut digits = 0;
            let mut best = None;
            for last in first..groups.len() {
                let Some(group) = groups.get(last) else { break };
                digits += group.end - group.start;
                if digits > MAX {
                    break;
                }
                if last > first {
                    let previous = groups.get(last - 1).map(|g| g.separator);
                    if previous != groups.get(first).map(|g| g.separator) {
                        break;
                    }
                }
                let candidate = groups.get(first..=last).unwrap_or_default();
                if digits >= MIN && luhn_valid(text, candidate) {
                    best = Some(last);
                }
            }
            match (best, groups.get(first)) {
                (Some(last), Some(start)) => {
                    if let Some(end) = groups.get(last) {
                        found(start.start..end.end);
                    }
                    first = last.saturating_add(1);
                }
                _ => first = first.saturating_add(1),
            }
        }
    }
}

struct Group {
    start: usize,
    end: usize,
    /// The separator to the next group of the same run, or 0 at the end of the run.
    separator: u8,
}

fn luhn_valid(text: &[u8], groups: &[Group]) -> bool {
    let mut sum = 0;
    let mut double = false;
    for group in groups.iter().rev() {
        for &byte in text
            .get(group.start..group.end)
            .unwrap_or_default()
            .iter()
            .rev()
        {
            let mut d = value(byte);
            if double {
                d *= 2;
                if d > 9 {
                    d -= 9;
                }
            }
            sum += d;
            double = !double;
        }
    }
    sum % 10 == 0
}

/// Email addresses: a dot-atom local part (RFC 5322 `atext` characters and single dots), `@`,
/// and a host name of at least two labels whose last label is 2 to 63 letters. Quoted local
/// parts, comments, IP-literal domains and non-ASCII (internationalised) addresses are not
/// matched. Guard: the top-level label must be letters, so `user@10.0.0.1` and `a@b` are not
/// addresses.
pub(crate) fn emails(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    let mut from = 0;
    while let Some(offset) = text
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == b'@'))
    {
        let at_sign = from.saturating_add(offset);
        from = at_sign.saturating_add(1);
        let Some(start) = local_part_start(text, at_sign) else {
            continue;
        };
        let Some(end) = domain_end(text, at_sign.saturating_add(1)) else {
            continue;
        };
        found(start..end);
        from = end;
    }
}

fn atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~-".contains(&byte)
}

fn local_part_start(text: &[u8], at_sign: usize) -> Option<usize> {
    if !atext(before(text, at_sign, 1)) {
        return None;
    }
    let mut start = at_sign;
    while start > 0 {
        let byte = before(text, start, 1);
        let dot_between = byte == b'.' && atext(before(text, start, 2));
        if !(atext(byte) || dot_between) {
            break;
        }
        start -= 1;
    }
    // A dot cannot start the local part; `..x@` begins at `x`.
    while at(text, start) == b'.' {
        start = start.saturating_add(1);
    }
    let local = at_sign.saturating_sub(start);
    (local > 0 && local <= 64).then_some(start)
}

fn domain_end(text: &[u8], start: usize) -> Option<usize> {
    // The longest run of labels that has at least two and ends in a possible top-level label.
    let mut labels = 0;
    let mut end = None;
    let mut i = start;
    loop {
        let label_start = i;
        while at(text, i).is_ascii_alphanumeric() || at(text, i) == b'-' {
            i = i.saturating_add(1);
        }
        let label = text.get(label_start..i).unwrap_or_default();
        let valid = !label.is_empty()
            && label.len() <= 63
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
            && i - start <= 253;
        if !valid {
            break;
        }
        labels += 1;
        if labels >= 2 && label.len() >= 2 && label.iter().all(u8::is_ascii_alphabetic) {
            end = Some(i);
        }
        if at(text, i) == b'.' && at(text, i.saturating_add(1)).is_ascii_alphanumeric() {
            i = i.saturating_add(1);
        } else {
            break;
        }
    }
    end
}

/// US Social Security numbers written `AAA-GG-SSSS`. Guard: the numbers never issued are
/// skipped (area 000, 666 and 900–999, group 00, serial 0000), and so are digits that continue
/// a longer dashed number on either side (`1-123-45-6789`, `123-45-6789-1`). Without dashes
/// nine digits are too common to be told apart; other countries' ids are a `regex` detector.
pub(crate) fn us_social_security_numbers(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    const SHAPE: &[u8] = b"ddd-dd-dddd";
    let mut from = 0;
    // Candidates start three bytes before a dash.
    while let Some(dash) = next(text, from, |byte| byte == b'-') {
        from = dash.saturating_add(1);
        let Some(i) = dash.checked_sub(3) else {
            continue;
        };
        if number_before(text, i, b"-") || !shaped(text, i, SHAPE) {
            continue;
        }
        let end = i.saturating_add(SHAPE.len());
        let number = |from: usize, len: usize| {
            (from..from.saturating_add(len)).fold(0, |n, k| n * 10 + value(at(text, k)))
        };
        let area = number(i, 3);
        let group = number(i.saturating_add(4), 2);
        let serial = number(i.saturating_add(7), 4);
        let issued = area != 0 && area != 666 && area < 900 && group != 0 && serial != 0;
        if issued && !number_after(text, end, b"-") {
            found(i..end);
            from = end;
        }
    }
}

/// Whether `shape` (`d` for a digit, any other byte literally) is at `start`.
fn shaped(text: &[u8], start: usize, shape: &[u8]) -> bool {
    shape.iter().enumerate().all(|(k, &want)| {
        let byte = at(text, start.saturating_add(k));
        if want == b'd' {
            digit(byte)
        } else {
            byte == want
        }
    })
}

/// IBANs: two capital letters, two check digits and up to 30 capital letters or digits (15 to
/// 34 in all), compact or in groups of four separated by single spaces (the last group may be
/// shorter). Guard: the ISO 13616 mod-97 check (96 in 97 random strings fail it), and the
/// match must not be part of a longer word.
pub(crate) fn ibans(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    let upper_or_digit = |byte: u8| byte.is_ascii_uppercase() || digit(byte);
    let mut from = 0;
    while let Some(i) = next(text, from, |byte| byte.is_ascii_uppercase()) {
        from = i.saturating_add(1);
        let starts = at(text, i.saturating_add(1)).is_ascii_uppercase()
            && digit(at(text, i.saturating_add(2)))
            && digit(at(text, i.saturating_add(3)))
            && !before(text, i, 1).is_ascii_alphanumeric();
        if !starts {
            continue;
        }
        let mut token_end = i;
        while upper_or_digit(at(text, token_end)) {
            token_end = token_end.saturating_add(1);
        }
        let mut matched = None;
        if token_end - i == 4 && at(text, token_end) == b' ' {
            // Grouped: the first group is the country and check digits.
            let mut ends = Vec::new();
            let mut length = 4;
            let mut k = token_end;
            while at(text, k) == b' ' {
                let group_start = k.saturating_add(1);
                let mut g = group_start;
                while upper_or_digit(at(text, g)) {
                    g = g.saturating_add(1);
                }
                let len = g - group_start;
                if len == 0 || len > 4 || at(text, g).is_ascii_alphanumeric() {
                    break;
                }
                length += len;
                ends.push((g, length));
                if len < 4 {
                    break;
                }
                k = g;
            }
            matched = ends.iter().rev().find_map(|&(end, length)| {
                ((15..=34).contains(&length) && iban_checksum_valid(text, i, end)).then_some(end)
            });
        } else if (15..=34).contains(&(token_end - i))
            && !at(text, token_end).is_ascii_alphanumeric()
            && iban_checksum_valid(text, i, token_end)
        {
            matched = Some(token_end);
        }
        if let Some(end) = matched {
            found(i..end);
            from = end;
        }
    }
}

/// ISO 13616: move the first four characters to the end, read letters as 10–35, and the
/// number modulo 97 is 1.
fn iban_checksum_valid(text: &[u8], start: usize, end: usize) -> bool {
    let characters = text
        .get(start..end)
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(u8::is_ascii_alphanumeric);
    let rearranged = characters.clone().skip(4).chain(characters.take(4));
    let mut remainder = 0u32;
    for byte in rearranged {
        remainder = if digit(byte) {
            (remainder * 10 + value(byte)) % 97
        } else {
            (remainder * 100 + u32::from(byte.to_ascii_uppercase().wrapping_sub(b'A')) + 10) % 97
        };
    }
    remainder == 1
}

/// Phone numbers in two forms.
///
/// E.164: `+`, a country code not starting with 0, 8 to 15 digits in all, optionally grouped
/// with spaces, dashes or parentheses (at most two separator characters between groups, as in
/// `+1 (415) 555-2671`). Guard: the `+` must not follow a letter or digit, and a group is
/// never split, so 16 or more contiguous digits are not a phone number.
///
/// North American: `(NNN) NNN-NNNN`, `(NNN)NNN-NNNN`, `(NNN) NNN NNNN`, `NNN-NNN-NNNN` and
/// `NNN.NNN.NNNN`. Guard: area code and exchange start with 2–9 as the numbering plan requires,
/// and the digits must not continue a longer number (`1-415-555-2671-9`).
pub(crate) fn phone_numbers(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    e164_numbers(text, found);
    north_american_numbers(text, found);
}

fn e164_numbers(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    let separator = |byte: u8| matches!(byte, b' ' | b'-' | b'(' | b')');
    let mut from = 0;
    while let Some(offset) = text
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == b'+'))
    {
        let plus = from.saturating_add(offset);
        from = plus.saturating_add(1);
        let first = at(text, from);
        if !digit(first) || first == b'0' || before(text, plus, 1).is_ascii_alphanumeric() {
            continue;
        }
        let mut j = from;
        let mut digits = 0;
        let mut end = None;
        loop {
            let group_start = j;
            while digit(at(text, j)) {
                j = j.saturating_add(1);
            }
            digits += j - group_start;
            if j == group_start || digits > 15 {
                break;
            }
            if digits >= 8 {
                end = Some(j);
            }
            let mut k = j;
            while separator(at(text, k)) && k - j < 2 {
                k = k.saturating_add(1);
            }
            if k == j || !digit(at(text, k)) {
                break;
            }
            j = k;
        }
        if let Some(end) = end {
            found(plus..end);
            from = end;
        }
    }
}

fn north_american_numbers(text: &[u8], found: &mut impl FnMut(Range<usize>)) {
    // (shape, offset of the area code, offset of the exchange)
    const SHAPES: [(&[u8], usize, usize); 6] = [
        (b"(ddd) ddd-dddd", 1, 6),
        (b"(ddd)ddd-dddd", 1, 5),
        (b"(ddd) ddd dddd", 1, 6),
        (b"(ddd) ddd.dddd", 1, 6),
        (b"ddd-ddd-dddd", 0, 4),
        (b"ddd.ddd.dddd", 0, 4),
    ];
    let mut from = 0;
    // Candidates start at a parenthesis, or three digits before a dash or dot.
    while let Some(p) = next(text, from, |byte| matches!(byte, b'(' | b'-' | b'.')) {
        from = p.saturating_add(1);
        let start = if at(text, p) == b'(' {
            Some(p)
        } else {
            p.checked_sub(3)
                .filter(|&i| digit(at(text, i)) && !number_before(text, i, b"-."))
        };
        let Some(i) = start else {
            continue;
        };
        let matched = SHAPES.iter().find_map(|&(shape, area, exchange)| {
            let end = i.saturating_add(shape.len());
            let valid = shaped(text, i, shape)
                && at(text, i.saturating_add(area)) >= b'2'
                && at(text, i.saturating_add(exchange)) >= b'2'
                && !number_after(text, end, b"-.");
            valid.then_some(end)
        });
        if let Some(end) = matched {
            found(i..end);
            from = end;
        }
    }
}
