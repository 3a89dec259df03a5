//! Param types that carry their bounds: serde refuses a value outside them and the JSON Schema
//! states them (`minimum`, `exclusiveMinimum`, `maximum`, `exclusiveMaximum`), so `smelt
//! validate`, editors and the stages agree on what is valid. They serialize as the plain
//! number, so a param's cache key does not change when its type gains a bound.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number type a bound can apply to.
pub trait Number: Copy + PartialOrd + fmt::Display + Serialize + JsonSchema {
    fn as_f64(self) -> f64;
}

impl Number for f32 {
    fn as_f64(self) -> f64 {
        self.into()
    }
}

impl Number for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

impl Number for usize {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

/// The range a [`Bounded`] value must lie in.
pub trait Bounds {
    /// The lower bound, and whether it is excluded.
    const LOW: Option<(f64, bool)> = None;
    /// The upper bound, and whether it is excluded.
    const HIGH: Option<(f64, bool)> = None;

    /// The range in words ("above 0", "at least 0 and below 1").
    fn words() -> String {
        let low = Self::LOW.map(|(x, open)| {
            let word = if open { "above" } else { "at least" };
            format!("{word} {x}")
        });
        let high = Self::HIGH.map(|(x, open)| {
            let word = if open { "below" } else { "at most" };
            format!("{word} {x}")
        });
        [low, high]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ")
    }

    fn contains(x: f64) -> bool {
        let above = Self::LOW.is_none_or(|(low, open)| if open { x > low } else { x >= low });
        let below = Self::HIGH.is_none_or(|(high, open)| if open { x < high } else { x <= high });
        above && below
    }
}

/// Above 0: learning rates, epsilons, temperatures of a loss.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct AboveZero;
impl Bounds for AboveZero {
    const LOW: Option<(f64, bool)> = Some((0.0, true));
}

/// 0 or more: weight decay, a clipping norm (0: off), a loss weight.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct AtLeastZero;
impl Bounds for AtLeastZero {
    const LOW: Option<(f64, bool)> = Some((0.0, false));
}

/// From 0 up to, not including, 1: dropout rates, Adam's betas, a held-out fraction.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct BelowOne;
impl Bounds for BelowOne {
    const LOW: Option<(f64, bool)> = Some((0.0, false));
    const HIGH: Option<(f64, bool)> = Some((1.0, true));
}

/// From 0 to 1 inclusive: similarity and confidence thresholds.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct ZeroToOne;
impl Bounds for ZeroToOne {
    const LOW: Option<(f64, bool)> = Some((0.0, false));
    const HIGH: Option<(f64, bool)> = Some((1.0, false));
}

/// From 0 up to, not including, ½: the share of flipped preference labels.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct BelowHalf;
impl Bounds for BelowHalf {
    const LOW: Option<(f64, bool)> = Some((0.0, false));
    const HIGH: Option<(f64, bool)> = Some((0.5, true));
}

/// A number within `B`'s range.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
pub struct Bounded<T, B>(T, PhantomData<B>);

/// Above 0.
pub type Positive<T = f64> = Bounded<T, AboveZero>;
/// 0 or more.
pub type NonNegative<T = f64> = Bounded<T, AtLeastZero>;
/// In [0, 1).
pub type Fraction<T = f64> = Bounded<T, BelowOne>;
/// In [0, 1].
pub type Share<T = f64> = Bounded<T, ZeroToOne>;

impl<T: Number, B: Bounds> Bounded<T, B> {
    /// `value`, or why it is out of range.
    pub fn new(value: T) -> Result<Self, String> {
        if B::contains(value.as_f64()) {
            Ok(Bounded(value, PhantomData))
        } else {
            Err(format!("{value} is not {}", B::words()))
        }
    }

    /// A value known to be in range (a default).
    ///
    /// # Panics
    /// When it is not: a bug in the default.
    pub fn of(value: T) -> Self {
        Self::new(value).expect("a default within its bounds")
    }

    pub fn get(self) -> T {
        self.0
    }
}

impl<T: fmt::Debug, B> fmt::Debug for Bounded<T, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: fmt::Display, B> fmt::Display for Bounded<T, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, B> Serialize for Bounded<T, B> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Number + Deserialize<'de>, B: Bounds> Deserialize<'de> for Bounded<T, B> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(T::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl<T: Number, B: Bounds> JsonSchema for Bounded<T, B> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("{} {}", T::schema_name(), B::words()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = T::json_schema(generator);
        // A whole bound reads `0`, not `0.0`, in the schema and in messages.
        let number = |x: f64| match x.fract() == 0.0 {
            true => serde_json::Value::from(x as i64),
            false => serde_json::Value::from(x),
        };
        if let Some((low, open)) = B::LOW {
            let keyword = if open { "exclusiveMinimum" } else { "minimum" };
            schema.insert(keyword.into(), number(low));
        }
        if let Some((high, open)) = B::HIGH {
            let keyword = if open { "exclusiveMaximum" } else { "maximum" };
            schema.insert(keyword.into(), number(high));
        }
        schema
    }
}

/// Why `pattern` is not a regex (the `regex` crate's reason, on one line), if it is not.
pub fn regex_problem(pattern: &str) -> Option<String> {
    let error = regex::Regex::new(pattern).err()?.to_string();
    let reason = error.lines().last().unwrap_or_default();
    Some(format!(
        "`{pattern}` is not a valid regex ({})",
        reason.trim_start_matches("error: ")
    ))
}

/// Schema for a non-empty list: serde refuses an empty one too ([`non_empty`]).
pub fn non_empty_schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let items = generator.subschema_for::<T>();
    json_schema!({ "type": "array", "items": items, "minItems": 1 })
}

/// Deserializes an optional list that, when given, must name at least one item.
pub fn some_non_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Vec<T>>, D::Error> {
    non_empty(deserializer).map(Some)
}

/// Deserializes a list that must name at least one item.
pub fn non_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    let items = Vec::<T>::deserialize(deserializer)?;
    if items.is_empty() {
        return Err(serde::de::Error::custom(
            "the list is empty: name at least one",
        ));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_and_the_schema_refuse_the_same_values() {
        let schema = serde_json::to_value(schemars::schema_for!(Fraction<f32>)).unwrap();
        assert_eq!(schema["minimum"], 0);
        assert_eq!(schema["exclusiveMaximum"], 1);
        let validator = jsonschema::validator_for(&schema).unwrap();
        for x in [-0.5, 0.0, 0.3, 0.999, 1.0, 7.0] {
            let value = serde_json::json!(x);
            let serde = serde_json::from_value::<Fraction<f32>>(value.clone()).is_ok();
            assert_eq!(serde, validator.is_valid(&value), "{x}");
        }
        let positive = serde_json::to_value(schemars::schema_for!(Positive)).unwrap();
        assert_eq!(positive["exclusiveMinimum"], 0);
        let err = serde_json::from_value::<Positive>(serde_json::json!(-1.0)).unwrap_err();
        assert!(err.to_string().contains("-1 is not above 0"), "{err}");
    }

    #[test]
    fn bounded_values_serialize_as_the_plain_number() {
        let lr: Positive = serde_json::from_value(serde_json::json!(0.001)).unwrap();
        assert_eq!(serde_json::to_value(lr).unwrap(), serde_json::json!(0.001));
        let dropout = Fraction::<f32>::of(0.1);
        assert_eq!(
            serde_json::to_value(dropout).unwrap(),
            serde_json::to_value(0.1f32).unwrap()
        );
    }
}
