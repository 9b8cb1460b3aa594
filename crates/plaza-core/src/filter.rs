//! Filter expressions: which rows a live-data subscription wants, in Snorky's syntax.
//!
//! A filter is a JSON array in prefix notation:
//!
//! | expression | true when |
//! |---|---|
//! | `["==", field, value]`, `["!=", field, value]` | the field is present and (not) equal to `value` |
//! | `["<", field, value]`, `["<=", ..]`, `[">", ..]`, `[">=", ..]` | the field is present and ordered that way against `value` |
//! | `["in", field, [v1, v2, ...]]` | the field is present and equal to one of the values |
//! | `["and", f1, f2, ...]` | every sub-filter is true (`["and"]` is true) |
//! | `["or", f1, f2, ...]` | some sub-filter is true (`["or"]` is false) |
//! | `["not", f]` | `f` is false |
//!
//! A subscription's filter is evaluated against every row change of its model, so it is
//! [compiled](Filter::compile) once, when the subscription is made, into a tree with its field
//! paths split and its constants converted; [`Filter::matches`] then walks that tree without
//! allocating. Anything wrong with a filter is reported at compile time, with where it is (see
//! [`FilterError`]), never when a row arrives.
//!
//! # Semantics
//!
//! - **Fields** are strings. A dotted field is a path into nested objects: `"player.color"` is
//!   `row.player.color`. (Snorky documents this but its code looks every segment up on the
//!   top-level object; Plaza follows the documentation.) A path never descends into an array, and
//!   a key that itself contains a `.` cannot be named.
//! - **A missing field makes every comparison false**, `!=` included: `["!=", "x", 1]` is false
//!   for a row without `x`, while `["not", ["==", "x", 1]]` is true for it (as in Snorky).
//! - **Equality** (`==`, `!=`, `in`) is JSON equality with numbers compared by value: `1 == 1.0`
//!   and `-0.0 == 0.0`; integers beyond 2^53 are compared exactly, never rounded through `f64`.
//!   Values of different JSON types are never equal; in particular `true != 1` (Python, hence
//!   Snorky, says `True == 1`). Arrays and objects are equal when they are deeply equal (objects
//!   regardless of key order, numbers inside by value).
//! - **Ordering** (`<`, `<=`, `>`, `>=`) is defined between two numbers (by value, exactly) and
//!   between two strings (by Unicode code point, which is the byte order of UTF-8). Ordering
//!   anything else is false: `["<", "age", 21]` is false for `{"age": "20"}`, and for a boolean,
//!   null, array or object field. A filter that orders by a boolean, null, array or object
//!   *constant* could never match, so it is rejected at compile time.
//! - **Empty `and` / `or`** are accepted: `["and"]` is true and `["or"]` is false, as in Snorky.
//! - **Unknown operators** are rejected at compile time (Snorky evaluated them as false inside
//!   `and`/`or`/`not` and failed at the top level).
//!
//! # Limits
//!
//! A filter may be at most [`MAX_DEPTH`] levels deep and have at most [`MAX_NODES`] nodes, else
//! [`FilterError::TooComplex`]. The top-level operator is at depth 1; each operand (sub-filter or
//! constant) is one level deeper than its operator, and each element of an array or object
//! constant one level deeper than the constant. Every operator counts as a node, and so does every
//! JSON value inside a constant (an `in` list counts itself and each of its values), so the limits
//! bound both the evaluation time and the recursion depth. A field is at most [`MAX_FIELD_LEN`]
//! bytes and has no empty segment (`""`, `".a"`, `"a..b"` and `"a."` are rejected).

use std::cmp::Ordering;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

use serde_json::{Number, Value};

/// Deepest nesting a filter may have (see the module doc for how depth is counted).
pub const MAX_DEPTH: usize = 32;
/// Most nodes a filter may have: operators plus the JSON values of its constants.
pub const MAX_NODES: usize = 1000;
/// Longest field path, in bytes.
pub const MAX_FIELD_LEN: usize = 256;

/// A compiled filter expression. Cheap to evaluate, immutable, shareable between threads.
#[derive(Debug, Clone)]
pub struct Filter {
    root: Node,
}

impl Filter {
    /// Compiles a filter expression (see the module doc for the syntax and the limits).
    pub fn compile(expr: &Value) -> Result<Self, FilterError> {
        let mut nodes = 0;
        let root = compile_node(expr, 1, &mut nodes)?;
        Ok(Self { root })
    }

    /// Whether `row` (normally a JSON object) passes the filter. Never allocates.
    pub fn matches(&self, row: &Value) -> bool {
        self.root.eval(row)
    }
}

/// A field path such as `"player.color"`, split once into its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    text: Box<str>,
    segments: Box<[Box<str>]>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldPathError {
    #[error("the field name is empty")]
    Empty,
    #[error("the field name is {0} bytes long, the limit is {MAX_FIELD_LEN}")]
    TooLong(usize),
    #[error("field '{0}' has an empty segment")]
    EmptySegment(String),
}

impl FieldPath {
    /// Parses a dotted path. Segments are object keys; none may be empty.
    pub fn parse(text: &str) -> Result<Self, FieldPathError> {
        if text.is_empty() {
            return Err(FieldPathError::Empty);
        }
        if text.len() > MAX_FIELD_LEN {
            return Err(FieldPathError::TooLong(text.len()));
        }
        if text.split('.').any(str::is_empty) {
            return Err(FieldPathError::EmptySegment(text.to_owned()));
        }
        Ok(Self {
            text: text.into(),
            segments: text.split('.').map(Box::from).collect(),
        })
    }

    /// The value at this path in `row`, if every segment names a key of an object.
    pub fn lookup<'v>(&self, row: &'v Value) -> Option<&'v Value> {
        let mut value = row;
        for segment in &*self.segments {
            value = value.as_object()?.get(&**segment)?;
        }
        Some(value)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a filter was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filter is too complex: {0}")]
    TooComplex(ComplexityLimit),
    /// `at` says where: `operand 2 of 'and': operand 1 of 'not': unknown operator 'xor'`.
    #[error("{at}{problem}")]
    Invalid {
        at: Position,
        problem: FilterProblem,
    },
}

/// Which limit a [`FilterError::TooComplex`] filter broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ComplexityLimit {
    #[error("deeper than {MAX_DEPTH} levels")]
    Depth,
    #[error("more than {MAX_NODES} nodes")]
    Nodes,
}

/// Where in a filter a problem is: the chain of `(operator, operand number)` from the top. The
/// operand number is the index in the operator's array, so the first operand is 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(pub Vec<(&'static str, usize)>);

impl fmt::Display for Position {
    /// `operand 2 of 'and': operand 1 of 'not': `, or nothing at the top level.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (op, operand) in &self.0 {
            write!(f, "operand {operand} of '{op}': ")?;
        }
        Ok(())
    }
}

/// What is wrong at a [`Position`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterProblem {
    #[error("expected a filter like [\"==\", field, value], got {0}")]
    NotAnArray(&'static str),
    #[error("expected a filter like [\"==\", field, value], got an empty array")]
    Empty,
    #[error("the operator must be a string, got {0}")]
    OperatorNotString(&'static str),
    #[error("unknown operator '{0}'")]
    UnknownOperator(String),
    #[error("'{op}' takes {expected}, got {got}")]
    Arity {
        op: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("the field must be a string, got {0}")]
    FieldNotString(&'static str),
    #[error("{0}")]
    Field(FieldPathError),
    #[error("'in' needs an array of values, got {0}")]
    InNeedsArray(&'static str),
    #[error("'{op}' orders numbers or strings, got {got}, which could never match")]
    Unordered { op: &'static str, got: &'static str },
}

impl From<ComplexityLimit> for FilterError {
    fn from(limit: ComplexityLimit) -> Self {
        Self::TooComplex(limit)
    }
}

impl FilterError {
    fn problem(problem: FilterProblem) -> Self {
        Self::Invalid {
            at: Position::default(),
            problem,
        }
    }

    /// The same error, one operand further down from `op`.
    fn within(mut self, op: &'static str, operand: usize) -> Self {
        if let Self::Invalid { at, .. } = &mut self {
            at.0.insert(0, (op, operand));
        }
        self
    }
}

/// JSON equality as filters define it (see the module doc): numbers by value, exactly; objects
/// regardless of key order; different types never equal. Recursion stops at the shallower of the
/// two values.
pub fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| values_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| values_equal(v, w)))
        }
        _ => false,
    }
}

/// A hash of `value` consistent with [`values_equal`]: equal values hash the same, whatever their
/// number representation or key order. Only the first [`MAX_DEPTH`] levels are hashed (deeper
/// levels are left to the equality check): every constant that passed the limits is hashed
/// whole, and a deep row value costs no deep recursion. Never allocates.
pub(crate) fn canonical_hash<B: BuildHasher>(value: &Value, build: &B) -> u64 {
    let mut h = build.build_hasher();
    hash_into(value, build, &mut h, HASH_DEPTH);
    h.finish()
}

const HASH_DEPTH: usize = MAX_DEPTH;

fn hash_into<B: BuildHasher>(value: &Value, build: &B, h: &mut B::Hasher, depth: usize) {
    match value {
        Value::Null => h.write_u8(0),
        Value::Bool(b) => {
            h.write_u8(1);
            h.write_u8(u8::from(*b));
        }
        Value::Number(n) => {
            h.write_u8(2);
            match Num::of(n) {
                Some(Num::Int(i)) => h.write_i128(i),
                // Every float equal to an integer is integral: hash it as that integer. Other
                // floats equal only themselves (-0.0 went the integer way).
                Some(Num::Float(f)) => match exact_int(f) {
                    Some(i) => h.write_i128(i),
                    None => {
                        h.write_u8(0xf1);
                        h.write_u64(f.to_bits());
                    }
                },
                None => {}
            }
        }
        Value::String(s) => {
            h.write_u8(3);
            s.hash(h);
        }
        Value::Array(items) => {
            h.write_u8(4);
            h.write_usize(items.len());
            if depth > 0 {
                for item in items {
                    hash_into(item, build, h, depth - 1);
                }
            }
        }
        Value::Object(map) => {
            h.write_u8(5);
            h.write_usize(map.len());
            if depth > 0 {
                // Key order must not matter: combine the entries' own hashes commutatively.
                let mut sum = 0u64;
                for (k, v) in map {
                    let mut entry = build.build_hasher();
                    k.hash(&mut entry);
                    hash_into(v, build, &mut entry, depth - 1);
                    sum = sum.wrapping_add(entry.finish());
                }
                h.write_u64(sum);
            }
        }
    }
}

/// Checks that a constant (such as a key dealer's query) stays within the filter limits, counted
/// as if it were one operand of a top-level operator.
pub(crate) fn check_constant(value: &Value) -> Result<(), ComplexityLimit> {
    count_value(value, 2, &mut 1)
}

// ---- compiled form ----

#[derive(Debug, Clone)]
enum Node {
    Cmp {
        op: CmpOp,
        field: FieldPath,
        value: Const,
    },
    In {
        field: FieldPath,
        values: Box<[Const]>,
    },
    And(Box<[Node]>),
    Or(Box<[Node]>),
    Not(Box<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A comparison's constant, converted once so evaluation does not re-read a `serde_json::Number`
/// or re-match on the constant's type.
#[derive(Debug, Clone)]
enum Const {
    Null,
    Bool(bool),
    Num(Num),
    Str(Box<str>),
    /// An array or object, compared by [`values_equal`].
    Compound(Value),
}

/// A JSON number, exactly: every integer serde_json holds (u64 or i64) fits an `i128`.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Node {
    fn eval(&self, row: &Value) -> bool {
        match self {
            Node::Cmp { op, field, value } => field.lookup(row).is_some_and(|v| match op {
                CmpOp::Eq => value.equals(v),
                CmpOp::Ne => !value.equals(v),
                CmpOp::Lt => value.order(v) == Some(Ordering::Less),
                CmpOp::Le => matches!(value.order(v), Some(Ordering::Less | Ordering::Equal)),
                CmpOp::Gt => value.order(v) == Some(Ordering::Greater),
                CmpOp::Ge => matches!(value.order(v), Some(Ordering::Greater | Ordering::Equal)),
            }),
            Node::In { field, values } => field
                .lookup(row)
                .is_some_and(|v| values.iter().any(|c| c.equals(v))),
            Node::And(nodes) => nodes.iter().all(|n| n.eval(row)),
            Node::Or(nodes) => nodes.iter().any(|n| n.eval(row)),
            Node::Not(node) => !node.eval(row),
        }
    }
}

impl Const {
    fn new(value: &Value) -> Self {
        match value {
            Value::Null => Const::Null,
            Value::Bool(b) => Const::Bool(*b),
            Value::Number(n) => {
                Num::of(n).map_or_else(|| Const::Compound(value.clone()), Const::Num)
            }
            Value::String(s) => Const::Str(s.as_str().into()),
            Value::Array(_) | Value::Object(_) => Const::Compound(value.clone()),
        }
    }

    /// Whether the row's value `v` equals this constant.
    fn equals(&self, v: &Value) -> bool {
        match (self, v) {
            (Const::Null, Value::Null) => true,
            (Const::Bool(a), Value::Bool(b)) => a == b,
            (Const::Num(a), Value::Number(b)) => {
                Num::of(b).and_then(|b| b.compare(*a)) == Some(Ordering::Equal)
            }
            (Const::Str(a), Value::String(b)) => **a == **b,
            (Const::Compound(a), b) => values_equal(a, b),
            _ => false,
        }
    }

    /// How the row's value `v` orders against this constant, if they are both numbers or both
    /// strings.
    fn order(&self, v: &Value) -> Option<Ordering> {
        match (self, v) {
            (Const::Num(a), Value::Number(b)) => Num::of(b)?.compare(*a),
            (Const::Str(a), Value::String(b)) => Some(b.as_str().cmp(&**a)),
            _ => None,
        }
    }
}

impl Num {
    fn of(n: &Number) -> Option<Self> {
        if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else {
            n.as_f64().map(Num::Float)
        }
    }

    /// Exact comparison; `None` only for NaN (which serde_json does not produce).
    fn compare(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (Num::Float(a), Num::Float(b)) => a.partial_cmp(&b),
            (Num::Int(a), Num::Float(b)) => cmp_int_float(a, b),
            (Num::Float(a), Num::Int(b)) => cmp_int_float(b, a).map(Ordering::reverse),
        }
    }
}

fn numbers_equal(a: &Number, b: &Number) -> bool {
    match (Num::of(a), Num::of(b)) {
        (Some(x), Some(y)) => x.compare(y) == Some(Ordering::Equal),
        _ => a == b,
    }
}

/// 2^127: every `i128` is below it, every `f64` at or above it is above every `i128`.
const TWO_POW_127: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;

/// Compares an integer with a float without rounding either: the float's integral part is
/// converted exactly, then its fraction breaks a tie.
fn cmp_int_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    if f >= TWO_POW_127 {
        return Some(Ordering::Less);
    }
    if f < -TWO_POW_127 {
        return Some(Ordering::Greater);
    }
    let whole = f.trunc();
    // Exact: `whole` is integral and within the i128 range.
    let whole_int = whole as i128;
    Some(match i.cmp(&whole_int) {
        Ordering::Equal => {
            if f > whole {
                Ordering::Less
            } else if f < whole {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        }
        unequal => unequal,
    })
}

/// The integer a float is equal to, if it is integral and within the `i128` range.
fn exact_int(f: f64) -> Option<i128> {
    (f.fract() == 0.0 && f.abs() < TWO_POW_127).then_some(f as i128)
}

// ---- compilation ----

/// Counts one node at `depth` against the limits.
fn count(depth: usize, nodes: &mut usize) -> Result<(), ComplexityLimit> {
    if depth > MAX_DEPTH {
        return Err(ComplexityLimit::Depth);
    }
    *nodes += 1;
    if *nodes > MAX_NODES {
        return Err(ComplexityLimit::Nodes);
    }
    Ok(())
}

/// Counts a constant and everything in it.
fn count_value(value: &Value, depth: usize, nodes: &mut usize) -> Result<(), ComplexityLimit> {
    count(depth, nodes)?;
    match value {
        Value::Array(items) => items
            .iter()
            .try_for_each(|v| count_value(v, depth + 1, nodes)),
        Value::Object(map) => map
            .values()
            .try_for_each(|v| count_value(v, depth + 1, nodes)),
        _ => Ok(()),
    }
}

fn compile_node(expr: &Value, depth: usize, nodes: &mut usize) -> Result<Node, FilterError> {
    count(depth, nodes)?;
    let Value::Array(items) = expr else {
        return Err(FilterError::problem(FilterProblem::NotAnArray(type_name(
            expr,
        ))));
    };
    let Some((op, operands)) = items.split_first() else {
        return Err(FilterError::problem(FilterProblem::Empty));
    };
    let Value::String(op) = op else {
        return Err(FilterError::problem(FilterProblem::OperatorNotString(
            type_name(op),
        )));
    };
    let cmp = match op.as_str() {
        "and" | "or" => {
            let name = if op == "and" { "and" } else { "or" };
            let mut compiled = Vec::with_capacity(operands.len());
            for (i, operand) in operands.iter().enumerate() {
                compiled.push(
                    compile_node(operand, depth + 1, nodes).map_err(|e| e.within(name, i + 1))?,
                );
            }
            let compiled = compiled.into_boxed_slice();
            return Ok(if name == "and" {
                Node::And(compiled)
            } else {
                Node::Or(compiled)
            });
        }
        "not" => {
            let [operand] = operands else {
                return Err(arity("not", "1 operand (a filter)", operands.len()));
            };
            let inner = compile_node(operand, depth + 1, nodes).map_err(|e| e.within("not", 1))?;
            return Ok(Node::Not(Box::new(inner)));
        }
        "in" => {
            let [field, list] = operands else {
                return Err(arity(
                    "in",
                    "2 operands (a field and an array of values)",
                    operands.len(),
                ));
            };
            let field = compile_field(field).map_err(|e| e.within("in", 1))?;
            let Value::Array(values) = list else {
                return Err(
                    FilterError::problem(FilterProblem::InNeedsArray(type_name(list)))
                        .within("in", 2),
                );
            };
            count_value(list, depth + 1, nodes)?;
            return Ok(Node::In {
                field,
                values: values.iter().map(Const::new).collect(),
            });
        }
        "==" => (CmpOp::Eq, "=="),
        "!=" => (CmpOp::Ne, "!="),
        "<" => (CmpOp::Lt, "<"),
        "<=" => (CmpOp::Le, "<="),
        ">" => (CmpOp::Gt, ">"),
        ">=" => (CmpOp::Ge, ">="),
        other => {
            return Err(FilterError::problem(FilterProblem::UnknownOperator(
                shorten(other),
            )));
        }
    };
    let (op, name) = cmp;
    let [field, value] = operands else {
        return Err(arity(
            name,
            "2 operands (a field and a value)",
            operands.len(),
        ));
    };
    let field = compile_field(field).map_err(|e| e.within(name, 1))?;
    let ordering = !matches!(op, CmpOp::Eq | CmpOp::Ne);
    if ordering && !matches!(value, Value::Number(_) | Value::String(_)) {
        return Err(FilterError::problem(FilterProblem::Unordered {
            op: name,
            got: type_name(value),
        })
        .within(name, 2));
    }
    count_value(value, depth + 1, nodes)?;
    Ok(Node::Cmp {
        op,
        field,
        value: Const::new(value),
    })
}

fn compile_field(field: &Value) -> Result<FieldPath, FilterError> {
    let Value::String(field) = field else {
        return Err(FilterError::problem(FilterProblem::FieldNotString(
            type_name(field),
        )));
    };
    FieldPath::parse(field).map_err(|e| FilterError::problem(FilterProblem::Field(e)))
}

fn arity(op: &'static str, expected: &'static str, got: usize) -> FilterError {
    FilterError::problem(FilterProblem::Arity { op, expected, got })
}

/// Text from the input as quoted in an error: at most 64 bytes of it.
pub(crate) fn shorten(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// "a number", "an object", ...: for error messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn f(expr: Value) -> Filter {
        Filter::compile(&expr).unwrap()
    }

    fn err(expr: Value) -> String {
        Filter::compile(&expr).unwrap_err().to_string()
    }

    #[test]
    fn comparisons() {
        let row = json!({"n": 5, "s": "m", "b": true, "z": null});
        for (expr, want) in [
            (json!(["==", "n", 5]), true),
            (json!(["==", "n", 6]), false),
            (json!(["!=", "n", 6]), true),
            (json!(["!=", "n", 5]), false),
            (json!(["<", "n", 6]), true),
            (json!(["<", "n", 5]), false),
            (json!(["<=", "n", 5]), true),
            (json!([">", "n", 4]), true),
            (json!([">", "n", 5]), false),
            (json!([">=", "n", 5]), true),
            (json!([">=", "n", 5.5]), false),
            (json!(["<", "s", "n"]), true),
            (json!([">", "s", "l"]), true),
            (json!(["==", "s", "m"]), true),
            (json!(["==", "b", true]), true),
            (json!(["!=", "b", false]), true),
            (json!(["==", "z", null]), true),
            (json!(["!=", "z", null]), false),
        ] {
            assert_eq!(f(expr.clone()).matches(&row), want, "{expr}");
        }
    }

    #[test]
    fn a_missing_field_makes_every_comparison_false_even_not_equal() {
        let row = json!({"other": 1});
        for op in ["==", "!=", "<", "<=", ">", ">="] {
            assert!(!f(json!([op, "x", 1])).matches(&row), "{op}");
        }
        assert!(!f(json!(["in", "x", [1, null]])).matches(&row));
        assert!(
            !f(json!(["==", "x", null])).matches(&row),
            "missing is not null"
        );
        // ... but its negation is true, as in Snorky.
        assert!(f(json!(["not", ["==", "x", 1]])).matches(&row));
        // A row that is not an object has no fields at all.
        assert!(!f(json!(["!=", "x", 1])).matches(&json!([1, 2])));
    }

    #[test]
    fn numbers_compare_by_value_across_integer_and_float() {
        assert!(f(json!(["==", "n", 1])).matches(&json!({"n": 1.0})));
        assert!(f(json!(["==", "n", 1.0])).matches(&json!({"n": 1})));
        assert!(f(json!(["==", "n", 0.0])).matches(&json!({"n": -0.0})));
        assert!(f(json!(["==", "n", -0.0])).matches(&json!({"n": 0})));
        assert!(f(json!(["<", "n", 1.5])).matches(&json!({"n": 1})));
        assert!(f(json!([">", "n", -1.5])).matches(&json!({"n": -1})));
        assert!(f(json!(["<", "n", -1])).matches(&json!({"n": -1.5})));
        assert!(f(json!([">", "n", -3])).matches(&json!({"n": 2u64})));
        assert!(f(json!(["<", "n", u64::MAX])).matches(&json!({"n": i64::MIN})));
    }

    #[test]
    fn large_integers_are_compared_exactly() {
        let big = 9_007_199_254_740_993u64; // 2^53 + 1: rounds to 2^53 as an f64
        let row = json!({"n": big});
        assert!(!f(json!(["==", "n", 9_007_199_254_740_992.0])).matches(&row));
        assert!(f(json!([">", "n", 9_007_199_254_740_992.0])).matches(&row));
        assert!(f(json!(["==", "n", big])).matches(&row));
        assert!(!f(json!(["==", "n", big - 1])).matches(&row));
        assert!(f(json!(["<", "n", u64::MAX])).matches(&row));
        // u64::MAX as f64 is 2^64, one more than u64::MAX.
        let max = json!({"n": u64::MAX});
        assert!(f(json!(["<", "n", 18_446_744_073_709_551_616.0])).matches(&max));
        assert!(!f(json!(["==", "n", 18_446_744_073_709_551_616.0])).matches(&max));
        assert!(f(json!([">", "n", 1e300])).matches(&json!({"n": 1.7976931348623157e308})));
        assert!(f(json!(["<", "n", 1e300])).matches(&max));
        assert!(f(json!([">", "n", -1e300])).matches(&json!({"n": i64::MIN})));
    }

    #[test]
    fn strings_order_by_code_point() {
        // 'Z' < 'a' < 'é' (U+00E9) < '中' (U+4E2D) < '😀' (U+1F600)
        let order = ["Z", "a", "é", "中", "😀"];
        for (i, a) in order.iter().enumerate() {
            for (j, b) in order.iter().enumerate() {
                let row = json!({ "s": a });
                assert_eq!(f(json!(["<", "s", b])).matches(&row), i < j, "{a} < {b}");
            }
        }
        assert!(f(json!(["<", "s", "ab"])).matches(&json!({"s": "a"})));
    }

    #[test]
    fn ordering_between_different_types_is_false() {
        // Snorky's own test: {"age": "20"} does not match ["<", "age", 21].
        assert!(!f(json!(["<", "age", 21])).matches(&json!({"age": "20"})));
        assert!(!f(json!([">", "age", "1"])).matches(&json!({"age": 20})));
        for v in [json!(true), json!(null), json!([1]), json!({"a": 1})] {
            let row = json!({ "x": v });
            for op in ["<", "<=", ">", ">="] {
                assert!(!f(json!([op, "x", 0])).matches(&row), "{op} {v}");
                assert!(!f(json!([op, "x", ""])).matches(&row), "{op} {v}");
            }
        }
    }

    #[test]
    fn different_types_are_never_equal() {
        let row = json!({"t": true, "one": 1, "s": "1", "z": null});
        assert!(!f(json!(["==", "t", 1])).matches(&row), "true != 1");
        assert!(!f(json!(["==", "one", true])).matches(&row));
        assert!(!f(json!(["==", "s", 1])).matches(&row));
        assert!(!f(json!(["==", "z", false])).matches(&row));
        assert!(f(json!(["!=", "s", 1])).matches(&row));
    }

    #[test]
    fn arrays_and_objects_compare_by_deep_equality() {
        let row = json!({"a": [1, {"x": 2.0, "y": "z"}], "o": {"p": 1, "q": [true]}});
        assert!(f(json!(["==", "a", [1.0, {"y": "z", "x": 2}]])).matches(&row));
        assert!(!f(json!(["==", "a", [1, {"x": 2}]])).matches(&row));
        assert!(!f(json!(["==", "a", [{"x": 2, "y": "z"}, 1]])).matches(&row));
        assert!(f(json!(["==", "o", {"q": [true], "p": 1}])).matches(&row));
        assert!(f(json!(["!=", "o", {"p": 1}])).matches(&row));
        assert!(f(json!(["in", "o", [1, {"p": 1, "q": [true]}]])).matches(&row));
        // A compound constant never equals a scalar, and vice versa.
        assert!(!f(json!(["==", "o", [1]])).matches(&row));
        assert!(!f(json!(["==", "a", 1])).matches(&row));
    }

    #[test]
    fn in_uses_the_same_equality() {
        let row = json!({"n": 2, "s": "b"});
        assert!(f(json!(["in", "n", [1, 2.0, 3]])).matches(&row));
        assert!(!f(json!(["in", "n", ["2", true]])).matches(&row));
        assert!(f(json!(["in", "s", ["a", "b"]])).matches(&row));
        assert!(!f(json!(["in", "s", []])).matches(&row));
    }

    #[test]
    fn logic() {
        let row = json!({"prio": 5, "done": false});
        let snorky = f(json!([
            "and",
            [">=", "prio", 3],
            ["not", ["==", "done", true]]
        ]));
        assert!(snorky.matches(&row));
        assert!(!snorky.matches(&json!({"prio": "9"})));
        assert!(!snorky.matches(&json!({})));
        assert!(f(json!(["or", ["==", "prio", 1], ["==", "prio", 5]])).matches(&row));
        assert!(!f(json!(["or", ["==", "prio", 1], ["==", "done", true]])).matches(&row));
        assert!(!f(json!(["and", ["==", "prio", 5], ["==", "done", true]])).matches(&row));
        assert!(f(json!(["not", ["not", ["==", "prio", 5]]])).matches(&row));
    }

    #[test]
    fn empty_and_is_true_and_empty_or_is_false() {
        assert!(f(json!(["and"])).matches(&json!({})));
        assert!(!f(json!(["or"])).matches(&json!({})));
        assert!(f(json!(["not", ["or"]])).matches(&json!({})));
    }

    #[test]
    fn dotted_fields_are_nested_paths() {
        let row = json!({"name": "bob", "owner": {"name": "alice", "team": {"id": 7}}, "list": [{"a": 1}]});
        assert!(f(json!(["==", "owner.name", "alice"])).matches(&row));
        // Snorky's code would have looked up the top-level "name" here: Plaza does not.
        assert!(!f(json!(["==", "owner.name", "bob"])).matches(&row));
        assert!(f(json!(["==", "owner.team.id", 7])).matches(&row));
        assert!(!f(json!(["==", "owner.team.id.x", 7])).matches(&row));
        assert!(
            !f(json!(["==", "name.x", "bob"])).matches(&row),
            "through a string"
        );
        assert!(
            !f(json!(["==", "list.0.a", 1])).matches(&row),
            "never into arrays"
        );
        // A key holding a dot cannot be named.
        assert!(!f(json!(["==", "a.b", 1])).matches(&json!({"a.b": 1})));
    }

    #[test]
    fn field_paths_are_validated() {
        assert_eq!(
            err(json!(["==", "", 1])),
            "operand 1 of '==': the field name is empty"
        );
        for bad in [".a", "a.", "a..b", "."] {
            assert_eq!(
                err(json!(["==", bad, 1])),
                format!("operand 1 of '==': field '{bad}' has an empty segment")
            );
        }
        let long = "a".repeat(MAX_FIELD_LEN + 1);
        assert_eq!(
            err(json!(["in", long, []])),
            "operand 1 of 'in': the field name is 257 bytes long, the limit is 256"
        );
        assert!(Filter::compile(&json!(["==", "a".repeat(MAX_FIELD_LEN), 1])).is_ok());
        assert_eq!(
            err(json!(["==", 3, 1])),
            "operand 1 of '==': the field must be a string, got a number"
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(
            err(json!(["and", ["==", "a", 1], ["xor", "a", 2]])),
            "operand 2 of 'and': unknown operator 'xor'"
        );
        assert_eq!(
            err(json!(["or", ["not", ["<", "a", true]]])),
            "operand 1 of 'or': operand 1 of 'not': operand 2 of '<': '<' orders numbers or \
             strings, got a boolean, which could never match"
        );
        assert_eq!(
            err(json!({"==": 1})),
            "expected a filter like [\"==\", field, value], got an object"
        );
        assert_eq!(
            err(json!(null)),
            "expected a filter like [\"==\", field, value], got null"
        );
        assert_eq!(
            err(json!([])),
            "expected a filter like [\"==\", field, value], got an empty array"
        );
        assert_eq!(
            err(json!([1, "a", 2])),
            "the operator must be a string, got a number"
        );
        assert_eq!(
            err(json!(["not"])),
            "'not' takes 1 operand (a filter), got 0"
        );
        assert_eq!(
            err(json!(["==", "a"])),
            "'==' takes 2 operands (a field and a value), got 1"
        );
        assert_eq!(
            err(json!(["in", "a", 1])),
            "operand 2 of 'in': 'in' needs an array of values, got a number"
        );
        assert_eq!(
            err(json!(["and", "a"])),
            "operand 1 of 'and': expected a filter like [\"==\", field, value], got a string"
        );
        for bad in [json!(null), json!([1]), json!({})] {
            assert!(err(json!([">=", "a", bad])).contains("could never match"));
        }
        let long = "x".repeat(100);
        assert_eq!(
            err(json!([long])),
            format!("unknown operator '{}...'", "x".repeat(64))
        );
    }

    #[test]
    fn limits() {
        let mut deep = json!(["==", "a", 1]);
        for _ in 0..MAX_DEPTH - 2 {
            deep = json!(["not", deep]);
        }
        // 30 nots, the comparison at depth 31, its constant at depth 32.
        assert!(Filter::compile(&deep).is_ok(), "32 levels");
        assert_eq!(
            Filter::compile(&json!(["not", deep])).unwrap_err(),
            FilterError::TooComplex(ComplexityLimit::Depth)
        );
        // A constant's own nesting counts.
        let mut nested = json!(1);
        for _ in 0..MAX_DEPTH - 2 {
            nested = json!([nested]);
        }
        assert!(Filter::compile(&json!(["==", "a", nested.clone()])).is_ok());
        nested = json!([nested]);
        assert_eq!(
            Filter::compile(&json!(["==", "a", nested])).unwrap_err(),
            FilterError::TooComplex(ComplexityLimit::Depth)
        );

        let many: Vec<Value> = (0..MAX_NODES - 1).map(|_| json!(["and"])).collect();
        let mut wide = vec![json!("or")];
        wide.extend(many);
        assert!(
            Filter::compile(&Value::Array(wide.clone())).is_ok(),
            "1000 nodes"
        );
        wide.push(json!(["and"]));
        assert_eq!(
            Filter::compile(&Value::Array(wide)).unwrap_err(),
            FilterError::TooComplex(ComplexityLimit::Nodes)
        );
        // `in` lists count each value: the operator, the list, 998 values.
        let values: Vec<u32> = (0..998).collect();
        assert!(Filter::compile(&json!(["in", "a", values])).is_ok());
        let values: Vec<u32> = (0..999).collect();
        assert_eq!(
            err(json!(["in", "a", values])),
            "filter is too complex: more than 1000 nodes"
        );
    }

    #[test]
    fn equal_values_hash_the_same() {
        let s = std::hash::RandomState::new();
        let same = [
            (json!(1), json!(1.0)),
            (json!(0), json!(-0.0)),
            (
                json!({"a": [1, 2.0], "b": null}),
                json!({"b": null, "a": [1.0, 2]}),
            ),
            (json!(u64::MAX), json!(u64::MAX)),
            (json!(-5), json!(-5.0)),
        ];
        for (a, b) in same {
            assert!(values_equal(&a, &b), "{a} {b}");
            assert_eq!(canonical_hash(&a, &s), canonical_hash(&b, &s), "{a} {b}");
        }
        assert_ne!(
            canonical_hash(&json!(1), &s),
            canonical_hash(&json!("1"), &s)
        );
        assert_ne!(
            canonical_hash(&json!(1), &s),
            canonical_hash(&json!(true), &s)
        );
        assert_ne!(
            canonical_hash(&json!(0.5), &s),
            canonical_hash(&json!(0), &s)
        );
    }

    // ---- property tests against a reference interpreter ----

    /// A plain interpreter of the filter JSON, written independently of the compiled form: it
    /// splits fields on every call and compares int against float through `f64` with a fix-up
    /// where the rounding could matter.
    pub(crate) fn reference(filter: &Value, row: &Value) -> bool {
        let items = filter.as_array().unwrap();
        let op = items[0].as_str().unwrap();
        match op {
            "and" => items[1..].iter().all(|f| reference(f, row)),
            "or" => items[1..].iter().any(|f| reference(f, row)),
            "not" => !reference(&items[1], row),
            _ => {
                let mut v = row;
                for seg in items[1].as_str().unwrap().split('.') {
                    match v.get(seg) {
                        Some(next) if v.is_object() => v = next,
                        _ => return false,
                    }
                }
                let c = &items[2];
                match op {
                    "==" => ref_eq(v, c),
                    "!=" => !ref_eq(v, c),
                    "in" => c.as_array().unwrap().iter().any(|c| ref_eq(v, c)),
                    _ => match ref_cmp(v, c) {
                        None => false,
                        Some(o) => match op {
                            "<" => o.is_lt(),
                            "<=" => o.is_le(),
                            ">" => o.is_gt(),
                            ">=" => o.is_ge(),
                            _ => unreachable!(),
                        },
                    },
                }
            }
        }
    }

    fn ref_int(n: &Number) -> Option<i128> {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    }

    fn ref_num_cmp(a: &Number, b: &Number) -> Ordering {
        match (ref_int(a), ref_int(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(x), None) => ref_int_float(x, b.as_f64().unwrap()),
            (None, Some(y)) => ref_int_float(y, a.as_f64().unwrap()).reverse(),
            (None, None) => a
                .as_f64()
                .unwrap()
                .partial_cmp(&b.as_f64().unwrap())
                .unwrap(),
        }
    }

    fn ref_int_float(i: i128, f: f64) -> Ordering {
        // Rounding i to f64 is monotonic, so a strict answer is right; a tie can only be wrong
        // when |f| >= 2^53, where f is integral and converts exactly.
        match (i as f64).partial_cmp(&f).unwrap() {
            Ordering::Equal if f.abs() >= 9_007_199_254_740_992.0 => i.cmp(&(f as i128)),
            o => o,
        }
    }

    pub(crate) fn ref_eq(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                if x.is_f64() && y.is_f64() {
                    x.as_f64() == y.as_f64()
                } else {
                    ref_num_cmp(x, y) == Ordering::Equal
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| ref_eq(a, b))
            }
            (Value::Object(x), Value::Object(y)) => {
                let keys_x: std::collections::BTreeSet<_> = x.keys().collect();
                let keys_y: std::collections::BTreeSet<_> = y.keys().collect();
                keys_x == keys_y && x.iter().all(|(k, v)| ref_eq(v, &y[k]))
            }
            _ => a == b,
        }
    }

    fn ref_cmp(a: &Value, b: &Value) -> Option<Ordering> {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => Some(if x.is_f64() && y.is_f64() {
                x.as_f64()?.partial_cmp(&y.as_f64()?)?
            } else {
                ref_num_cmp(x, y)
            }),
            (Value::String(x), Value::String(y)) => Some(x.chars().cmp(y.chars())),
            _ => None,
        }
    }

    /// The same value with every number that has another exact spelling respelled: integers as
    /// floats, integral floats as integers, -0.0 as 0.
    fn respell(v: &Value) -> Value {
        match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64().filter(|i| i.unsigned_abs() < 1 << 53) {
                    json!(i as f64)
                } else if let Some(f) = n
                    .as_f64()
                    .filter(|f| n.is_f64() && f.fract() == 0.0 && f.abs() < 1e18)
                {
                    json!(f as i64)
                } else {
                    v.clone()
                }
            }
            Value::Array(items) => Value::Array(items.iter().map(respell).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .rev()
                    .map(|(k, v)| (k.clone(), respell(v)))
                    .collect(),
            ),
            _ => v.clone(),
        }
    }

    /// Numbers chosen so that equalities and near-misses are frequent.
    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-3i64..4).prop_map(Value::from),
            (-3i64..4).prop_map(|i| Value::from(i as f64)),
            (-6i64..7).prop_map(|i| Value::from(i as f64 / 2.0)),
            Just(json!(-0.0)),
            Just(json!(9_007_199_254_740_992u64)),
            Just(json!(9_007_199_254_740_993u64)),
            Just(json!(9_007_199_254_740_992.0)),
            Just(json!(u64::MAX)),
            Just(json!(18_446_744_073_709_551_616.0)),
            Just(json!(i64::MIN)),
            Just(json!(-9_223_372_036_854_775_808.0)),
            Just(json!(1e300)),
        ]
    }

    pub(crate) fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => number(),
            2 => prop_oneof![Just("a"), Just("b"), Just("ab"), Just("é"), Just("Z"), Just("")]
                .prop_map(Value::from),
            1 => any::<bool>().prop_map(Value::from),
            1 => Just(Value::Null),
        ]
    }

    pub(crate) fn json_value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![Just("a".to_string()), Just("b".to_string())],
                    inner,
                    0..3
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: [&str; 6] = ["a", "b", "c", "n.a", "n.b", "n.n.a"];

    /// A row: an object with fields a, b, c and a nested n (sometimes missing).
    pub(crate) fn row() -> impl Strategy<Value = Value> {
        let leaf = || prop_oneof![4 => scalar(), 1 => json_value()];
        (
            proptest::option::weighted(0.85, leaf()),
            proptest::option::weighted(0.85, leaf()),
            proptest::option::weighted(0.85, leaf()),
            proptest::option::weighted(0.8, (leaf(), leaf(), proptest::option::of(leaf()))),
        )
            .prop_map(|(a, b, c, n)| {
                let mut row = serde_json::Map::new();
                for (k, v) in [("a", a), ("b", b), ("c", c)] {
                    if let Some(v) = v {
                        row.insert(k.into(), v);
                    }
                }
                if let Some((na, nb, nn)) = n {
                    let mut n = serde_json::Map::new();
                    n.insert("a".into(), na);
                    n.insert("b".into(), nb);
                    if let Some(x) = nn {
                        n.insert("n".into(), json!({ "a": x }));
                    }
                    row.insert("n".into(), Value::Object(n));
                }
                Value::Object(row)
            })
    }

    pub(crate) fn filter_expr() -> impl Strategy<Value = Value> {
        let field = proptest::sample::select(&FIELDS[..]);
        let leaf = prop_oneof![
            (
                proptest::sample::select(&["==", "!="][..]),
                field.clone(),
                prop_oneof![4 => scalar(), 1 => json_value()]
            )
                .prop_map(|(op, f, v)| json!([op, f, v])),
            (
                proptest::sample::select(&["<", "<=", ">", ">="][..]),
                field.clone(),
                prop_oneof![3 => number(), 1 => prop_oneof![Just("a"), Just("ab"), Just("é")].prop_map(Value::from)]
            )
                .prop_map(|(op, f, v)| json!([op, f, v])),
            (field, proptest::collection::vec(scalar(), 0..4))
                .prop_map(|(f, vs)| json!(["in", f, vs])),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|fs| {
                    let mut v = vec![json!("and")];
                    v.extend(fs);
                    Value::Array(v)
                }),
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|fs| {
                    let mut v = vec![json!("or")];
                    v.extend(fs);
                    Value::Array(v)
                }),
                inner.prop_map(|f| json!(["not", f])),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The compiled evaluator agrees with the reference interpreter.
        #[test]
        fn compiled_agrees_with_reference(expr in filter_expr(), rows in proptest::collection::vec(row(), 1..6)) {
            let filter = Filter::compile(&expr).unwrap();
            for row in &rows {
                prop_assert_eq!(filter.matches(row), reference(&expr, row), "filter {} row {}", expr, row);
            }
        }

        /// `values_equal` agrees with the reference, and equal values hash alike, also when
        /// their numbers are spelled differently.
        #[test]
        fn equality_and_hash(a in json_value(), b in json_value()) {
            let s = std::hash::RandomState::new();
            prop_assert_eq!(values_equal(&a, &b), ref_eq(&a, &b));
            if values_equal(&a, &b) {
                prop_assert_eq!(canonical_hash(&a, &s), canonical_hash(&b, &s));
            }
            let respelled = respell(&a);
            prop_assert!(values_equal(&a, &respelled), "{} {}", a, respelled);
            prop_assert_eq!(canonical_hash(&a, &s), canonical_hash(&respelled, &s));
        }

        /// Number ordering is a consistent total order on the sample: antisymmetric and agreeing
        /// with the reference.
        #[test]
        fn number_order(a in number(), b in number()) {
            let (x, y) = (Num::of(a.as_number().unwrap()).unwrap(), Num::of(b.as_number().unwrap()).unwrap());
            let o = x.compare(y).unwrap();
            prop_assert_eq!(Some(o.reverse()), y.compare(x));
            prop_assert_eq!(Some(o), ref_cmp(&a, &b));
        }
    }
}
