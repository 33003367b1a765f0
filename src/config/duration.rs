//! Durations in the configuration file: read as humantime reads them
//! ("500ms", "30s", "1h 30m", "7d"), printed back (`switchboard check`) in
//! hours, minutes, seconds and milliseconds: "24h" stays "24h" (humantime
//! would print "1day"), "90m" is "1h30m".

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub use crate::text::duration as format;

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    humantime_serde::deserialize(d)
}

/// The same for `Option<Duration>`.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "humantime_serde")] Duration);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(d)| d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 23, point 11): `check` printed "24h" as "1day".
    #[test]
    fn durations_print_as_a_configuration_writes_them_and_read_back() {
        for (d, text) in [
            (Duration::from_secs(86_400), "24h"),
            (Duration::from_secs(5_400), "1h30m"),
            (Duration::from_millis(1_500), "1s500ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_secs(7 * 86_400), "168h"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(humantime::parse_duration(text).expect("reads back"), d, "{text}");
        }
    }
}
