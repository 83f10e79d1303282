//! The few facts tcplb reads from a certificate that webpki does not
//! hand out: its validity dates, whether it is a CA (basicConstraints
//! `cA`), and whether it is self-signed (its issuer is its subject). A
//! minimal walk of the DER of a certificate that webpki has already
//! accepted: anything unexpected gives `None`, never a panic.
//!
//! ```text
//! Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
//!     signature, issuer, validity SEQUENCE { notBefore, notAfter },
//!     subject, subjectPublicKeyInfo, [1] OPTIONAL, [2] OPTIONAL,
//!     [3] extensions SEQUENCE OF Extension OPTIONAL }
//! Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
//! BasicConstraints ::= SEQUENCE { cA BOOLEAN DEFAULT FALSE, pathLenConstraint INTEGER OPTIONAL }
//! ```

use time::{Date, Month, Time};

const SEQUENCE: u8 = 0x30;
const BOOLEAN: u8 = 0x01;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
/// 2.5.29.19, basicConstraints.
const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

/// What tcplb checks of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    /// notBefore, in seconds since 1970 (UTC).
    pub not_before: i64,
    /// notAfter, in seconds since 1970 (UTC).
    pub not_after: i64,
    /// basicConstraints says `cA: TRUE`.
    pub is_ca: bool,
    /// Its issuer name is its subject name.
    pub self_signed: bool,
}

/// The facts of a DER certificate, or `None` if it does not have the shape.
pub(crate) fn facts(der: &[u8]) -> Option<Facts> {
    let cert = expect(SEQUENCE, der)?;
    let (SEQUENCE, tbs, _signature) = element(cert)? else {
        return None;
    };
    let mut tbs = Elements(tbs);
    let mut next = tbs.next()?;
    if next.0 == VERSION {
        next = tbs.next()?;
    }
    let _serial = next;
    let _signature = tbs.next()?;
    let issuer = tbs.next()?;
    let (tag, validity) = tbs.next()?;
    if tag != SEQUENCE {
        return None;
    }
    let subject = tbs.next()?;
    let _key = tbs.next()?;
    let mut dates = Elements(validity);
    let not_before = date(dates.next()?)?;
    let not_after = date(dates.next()?)?;
    let mut is_ca = false;
    for (tag, content) in tbs {
        if tag == EXTENSIONS {
            is_ca = basic_constraints_ca(expect(SEQUENCE, content)?)?;
        }
    }
    Some(Facts {
        not_before,
        not_after,
        is_ca,
        self_signed: issuer == subject,
    })
}

/// Whether the extensions say `cA: TRUE` (absent: false).
fn basic_constraints_ca(extensions: &[u8]) -> Option<bool> {
    for (tag, extension) in Elements(extensions) {
        if tag != SEQUENCE {
            return None;
        }
        let mut parts = Elements(extension);
        let (tag, id) = parts.next()?;
        if tag != OID || id != BASIC_CONSTRAINTS {
            continue;
        }
        let mut value = parts.next()?;
        if value.0 == BOOLEAN {
            value = parts.next()?;
        }
        if value.0 != OCTET_STRING {
            return None;
        }
        let constraints = expect(SEQUENCE, value.1)?;
        return Some(matches!(
            Elements(constraints).next(),
            Some((BOOLEAN, [b])) if *b != 0
        ));
    }
    Some(false)
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) as seconds since 1970.
fn date((tag, text): (u8, &[u8])) -> Option<i64> {
    let digits = |range: std::ops::Range<usize>| -> Option<i32> {
        let part = text.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (year, at) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 15) => (digits(0..4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let month = Month::try_from(u8::try_from(digits(at..at + 2)?).ok()?).ok()?;
    let day = u8::try_from(digits(at + 2..at + 4)?).ok()?;
    let [hour, minute, second] = [4, 6, 8].map(|i| digits(at + i..at + i + 2));
    let time = Time::from_hms(
        u8::try_from(hour?).ok()?,
        u8::try_from(minute?).ok()?,
        u8::try_from(second?).ok()?,
    )
    .ok()?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    Some(date.with_time(time).assume_utc().unix_timestamp())
}

/// The content of one element of tag `tag` that is all of `input`.
fn expect(tag: u8, input: &[u8]) -> Option<&[u8]> {
    match element(input)? {
        (t, content, []) if t == tag => Some(content),
        _ => None,
    }
}

/// The first element of `input`: its tag, its content, and what follows.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The elements of a constructed value, in order, as (tag, content); a
/// malformed one ends the walk.
struct Elements<'a>(&'a [u8]);

impl<'a> Iterator for Elements<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (tag, content, rest) = element(self.0)?;
        self.0 = rest;
        Some((tag, content))
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, date_time_ymd};

    use super::*;

    fn cert(is_ca: IsCa, from: (i32, u8, u8), to: (i32, u8, u8)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        params.is_ca = is_ca;
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(to.0, to.1, to.2);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_dates_and_basic_constraints() {
        let ca = cert(
            IsCa::Ca(BasicConstraints::Unconstrained),
            (2020, 1, 1),
            (2060, 6, 30),
        );
        let ca = facts(&ca).unwrap();
        assert_eq!(ca.not_before, 1_577_836_800, "2020-01-01T00:00:00Z");
        assert_eq!(
            ca.not_after, 2_855_779_200,
            "2060-06-30T00:00:00Z (GeneralizedTime)"
        );
        assert!(ca.is_ca && ca.self_signed);
        let leaf = facts(&cert(IsCa::NoCa, (1999, 12, 31), (2001, 1, 1))).unwrap();
        assert_eq!(leaf.not_before, 946_598_400, "1999-12-31 (UTCTime, 19xx)");
        assert!(!leaf.is_ca);
        let explicit = facts(&cert(IsCa::ExplicitNoCa, (2020, 1, 1), (2021, 1, 1))).unwrap();
        assert!(!explicit.is_ca, "basicConstraints present, cA false");
    }

    #[test]
    fn anything_else_is_none_without_panicking() {
        let good = cert(IsCa::NoCa, (2020, 1, 1), (2021, 1, 1));
        for cut in 0..good.len() {
            assert_eq!(facts(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(facts(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(facts(&[]), None);
    }
}
