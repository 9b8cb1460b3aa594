//! Live views: which subscriptions a row change (a *delta*) goes to, and as what.
//!
//! This is Snorky's DataSync model. The app declares **dealers**, each for one **model** (a table,
//! say `Task`); a client subscribes to a dealer with a **query**; the app publishes deltas
//! (`insert`, `update`, `delete` of one row of a model) and each goes to the subscriptions whose
//! query matches the row:
//!
//! - [`DealerKind::Broadcast`]: every subscription gets every delta of the model; the query is
//!   ignored (Snorky's `BroadcastDealer`, whose demos pass `null`).
//! - [`DealerKind::Key`]: the query is a JSON value; a row matches when its `field` equals it under
//!   filter equality ([`values_equal`](crate::filter::values_equal): `1 == 1.0`, `true != 1`).
//!   A row without the field matches nothing (Snorky's `SimpleDealer` failed the whole publish).
//!   Subscriptions are indexed by key, so routing costs O(matching subscriptions).
//! - [`DealerKind::Filter`]: the query is a [filter expression](crate::filter), compiled when the
//!   subscription is added. Every distinct filter of the dealer is evaluated per delta (identical
//!   filters are grouped and evaluated once), so routing costs O(distinct filters).
//!
//! An `insert` or `delete` goes unchanged to the subscriptions matching its `data`. An `update`
//! becomes, per subscription, according to whether the query matches `oldData` and `newData`:
//!
//! | matches oldData | matches newData | sent |
//! |---|---|---|
//! | yes | yes | the `update` |
//! | no | yes | `insert` of newData |
//! | yes | no | `delete` of oldData |
//! | no | no | nothing |
//!
//! A broadcast subscription matches everything, so it always gets the `update`. (Snorky 0.1.0a4
//! failed every update on a filter dealer; this table is its documented intent.) Deltas go only to
//! dealers of their own model. A subscription is one `(dealer, query)` item with its own
//! [`SubId`]: a client holding two items that both match gets the delta twice, as in Snorky.
//!
//! # Threads
//!
//! [`LiveIndex`] is shared by reference (`Sync` when the handles `S` are `Send + Sync`), with one
//! `RwLock` inside. [`LiveIndex::route`] takes the read lock for one delta, so any number of deltas
//! route concurrently; adding and removing subscriptions take the write lock. The routing callback
//! runs under the read lock: it must not block (pushing into a connection's queue is fine) and
//! must not add or remove subscriptions of the same index. A batch of deltas is routed one
//! [`route`](LiveIndex::route) call at a time, in order, so every subscription sees the batch's
//! deltas in order.
//!
//! # Measuring throughput
//!
//! Routing cost depends on the dealer kind: key dealers touch only the matching subscriptions,
//! filter dealers evaluate every distinct filter. To compare 10,000 key with 10,000 filter
//! subscriptions, put this in `crates/plaza-core/examples/live_bench.rs` and run
//! `cargo run --release -p plaza-core --example live_bench`:
//!
//! ```no_run
//! use plaza_core::filter::FieldPath;
//! use plaza_core::live::{Dealer, DealerKind, Delta, LiveIndex};
//! use serde_json::json;
//! use std::time::Instant;
//!
//! const SUBS: u64 = 10_000;
//! const DELTAS: u64 = 100_000;
//! let dealer = |kind| Dealer { name: "D".into(), model: "Task".into(), kind };
//! let by_owner = LiveIndex::<u64>::new(vec![dealer(DealerKind::Key {
//!     field: FieldPath::parse("owner")?,
//! })])?;
//! let filtered = LiveIndex::<u64>::new(vec![dealer(DealerKind::Filter)])?;
//! for i in 0..SUBS {
//!     by_owner.add(i, "D", &json!(i), i)?;
//!     filtered.add(i, "D", &json!(["and", ["==", "owner", i], [">=", "prio", 3]]), i)?;
//! }
//! // Updates that move a row from one owner to the next: a delete and an insert each.
//! let deltas: Vec<Delta> = (0..DELTAS)
//!     .map(|i| Delta::Update {
//!         model: "Task".into(),
//!         old_data: json!({"id": i, "owner": i % SUBS, "prio": 5}),
//!         new_data: json!({"id": i, "owner": (i + 1) % SUBS, "prio": 5}),
//!     })
//!     .collect();
//! for (name, index) in [("key", &by_owner), ("filter", &filtered)] {
//!     let start = Instant::now();
//!     let mut sent = 0;
//!     for delta in &deltas {
//!         sent += index.route(delta, |_, _, out| {
//!             std::hint::black_box(out);
//!         });
//!     }
//!     let secs = start.elapsed().as_secs_f64();
//!     println!("{name}: {:.0} deltas/s, {sent} sent", DELTAS as f64 / secs);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher, RandomState};
use std::sync::{PoisonError, RwLock};

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::filter::{
    self, ComplexityLimit, FieldPath, FieldPathError, Filter, FilterError, shorten, type_name,
};

/// One subscription item's id, unique within one [`LiveIndex`]. The server chooses it.
pub type SubId = u64;

// ---- dealers ----

/// How a dealer matches rows to queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DealerKind {
    /// Every delta of the model, whatever the query.
    Broadcast,
    /// Rows whose `field` equals the query.
    Key { field: FieldPath },
    /// Rows that pass the query, a filter expression.
    Filter,
}

/// A dealer: a name clients subscribe to, the model whose deltas it deals, and how it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dealer {
    pub name: String,
    pub model: String,
    pub kind: DealerKind,
}

/// `kind` of a [`DealerConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DealerKindName {
    Broadcast,
    Key,
    Filter,
}

/// A dealer as configured (`[[live.dealers]]`):
///
/// ```toml
/// [[live.dealers]]
/// name = "TasksByColor"
/// model = "Task"
/// kind = "key"        # "broadcast" | "key" | "filter"
/// key = "color"       # key dealers only: the (dotted) field to match
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealerConfig {
    /// What clients and the backend call the dealer; unique.
    pub name: String,
    /// The model whose deltas it deals, e.g. `Task`.
    pub model: String,
    pub kind: DealerKindName,
    /// Key dealers: the field whose value must equal the query, e.g. `color` or `owner.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A dealer configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DealerError {
    #[error("a dealer's name must not be empty")]
    EmptyName,
    #[error("dealer '{0}': model must not be empty")]
    EmptyModel(String),
    #[error("dealer '{0}': a key dealer needs `key`, the field to match (e.g. key = \"color\")")]
    MissingKey(String),
    #[error("dealer '{0}': `key` is only for key dealers")]
    UnexpectedKey(String),
    #[error("dealer '{dealer}': key: {error}")]
    BadKey {
        dealer: String,
        error: FieldPathError,
    },
    #[error("dealer '{0}' is declared twice")]
    Duplicate(String),
}

impl DealerConfig {
    /// Checks the configuration and returns the dealer it describes.
    pub fn validate(&self) -> Result<Dealer, DealerError> {
        check_names(&self.name, &self.model)?;
        let kind = match (self.kind, &self.key) {
            (DealerKindName::Key, None) => return Err(DealerError::MissingKey(self.name.clone())),
            (DealerKindName::Key, Some(key)) => DealerKind::Key {
                field: FieldPath::parse(key).map_err(|error| DealerError::BadKey {
                    dealer: self.name.clone(),
                    error,
                })?,
            },
            (_, Some(_)) => return Err(DealerError::UnexpectedKey(self.name.clone())),
            (DealerKindName::Broadcast, None) => DealerKind::Broadcast,
            (DealerKindName::Filter, None) => DealerKind::Filter,
        };
        Ok(Dealer {
            name: self.name.clone(),
            model: self.model.clone(),
            kind,
        })
    }
}

fn check_names(name: &str, model: &str) -> Result<(), DealerError> {
    if name.is_empty() {
        return Err(DealerError::EmptyName);
    }
    if model.is_empty() {
        return Err(DealerError::EmptyModel(name.to_owned()));
    }
    Ok(())
}

// ---- deltas ----

/// One row change, as the app publishes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Insert {
        model: String,
        data: Value,
    },
    Update {
        model: String,
        new_data: Value,
        old_data: Value,
    },
    Delete {
        model: String,
        data: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeltaKind {
    Insert,
    Update,
    Delete,
}

impl DeltaKind {
    /// The wire name: `insert`, `update` or `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaKind::Insert => "insert",
            DeltaKind::Update => "update",
            DeltaKind::Delete => "delete",
        }
    }
}

/// A delta that cannot be accepted; `item` is its index in the batch (from 0), if in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaError {
    pub item: Option<usize>,
    pub kind: DeltaErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaErrorKind {
    #[error("a delta must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("missing field '{0}'")]
    MissingField(&'static str),
    #[error("'type' must be a string, got {0}")]
    TypeNotString(&'static str),
    #[error("unknown delta type '{0}' (expected insert, update or delete)")]
    UnknownType(String),
    #[error("model must be a string, got {0}")]
    ModelNotString(&'static str),
    #[error("'{field}' must be an object (a row), got {got}")]
    DataNotObject {
        field: &'static str,
        got: &'static str,
    },
}

impl fmt::Display for DeltaError {
    /// `item 3: unknown delta type 'upsert' (expected insert, update or delete)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(item) = self.item {
            write!(f, "item {item}: ")?;
        }
        self.kind.fmt(f)
    }
}

impl std::error::Error for DeltaError {}

impl From<DeltaErrorKind> for DeltaError {
    fn from(kind: DeltaErrorKind) -> Self {
        Self { item: None, kind }
    }
}

impl Delta {
    /// Reads `{"type": "insert", "model": M, "data": {..}}`, `{"type": "update", "model": M,
    /// "newData": {..}, "oldData": {..}}` or `{"type": "delete", "model": M, "data": {..}}`.
    /// The rows must be JSON objects; other fields (such as Snorky's optional `tag`) are ignored.
    pub fn from_json(value: &Value) -> Result<Self, DeltaError> {
        check(value)?;
        Self::from_value(value.clone())
    }

    /// [`from_json`](Self::from_json), taking the rows out of `value` instead of copying them.
    pub fn from_value(value: Value) -> Result<Self, DeltaError> {
        let kind = check(&value)?;
        let Value::Object(mut map) = value else {
            return Err(DeltaErrorKind::NotAnObject("something else").into());
        };
        let mut take = |field| map.remove(field).unwrap_or(Value::Null);
        let model = match take("model") {
            Value::String(model) => model,
            _ => String::new(),
        };
        Ok(match kind {
            DeltaKind::Insert => Delta::Insert {
                model,
                data: take("data"),
            },
            DeltaKind::Update => Delta::Update {
                model,
                new_data: take("newData"),
                old_data: take("oldData"),
            },
            DeltaKind::Delete => Delta::Delete {
                model,
                data: take("data"),
            },
        })
    }

    pub fn kind(&self) -> DeltaKind {
        match self {
            Delta::Insert { .. } => DeltaKind::Insert,
            Delta::Update { .. } => DeltaKind::Update,
            Delta::Delete { .. } => DeltaKind::Delete,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Delta::Insert { model, .. }
            | Delta::Update { model, .. }
            | Delta::Delete { model, .. } => model,
        }
    }

    /// The delta as sent unchanged.
    pub fn as_out(&self) -> OutDelta<'_> {
        match self {
            Delta::Insert { model, data } => OutDelta::Insert { model, data },
            Delta::Update {
                model,
                new_data,
                old_data,
            } => OutDelta::Update {
                model,
                new_data,
                old_data,
            },
            Delta::Delete { model, data } => OutDelta::Delete { model, data },
        }
    }

    /// The wire form (see [`OutDelta::to_json`]).
    pub fn to_json(&self) -> Value {
        self.as_out().to_json()
    }
}

/// Validates every delta of a batch before any is used, so that one bad delta rejects the batch
/// and the error names it (`item 3: ...`, counting from 0).
pub fn validate_batch(items: &[Value]) -> Result<Vec<Delta>, DeltaError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| Delta::from_json(item).map_err(|e| e.at(i)))
        .collect()
}

/// [`validate_batch`], taking the rows out of `items` instead of copying them.
pub fn parse_batch(items: Vec<Value>) -> Result<Vec<Delta>, DeltaError> {
    if let Some((i, e)) = items
        .iter()
        .enumerate()
        .find_map(|(i, item)| check(item).err().map(|e| (i, e)))
    {
        return Err(DeltaError {
            item: Some(i),
            kind: e,
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| Delta::from_value(item).map_err(|e| e.at(i)))
        .collect()
}

impl DeltaError {
    fn at(mut self, item: usize) -> Self {
        self.item = Some(item);
        self
    }
}

/// Validates a delta's shape and returns its kind.
fn check(value: &Value) -> Result<DeltaKind, DeltaErrorKind> {
    let Value::Object(map) = value else {
        return Err(DeltaErrorKind::NotAnObject(type_name(value)));
    };
    let kind = match map.get("type") {
        None => return Err(DeltaErrorKind::MissingField("type")),
        Some(Value::String(t)) => match t.as_str() {
            "insert" => DeltaKind::Insert,
            "update" => DeltaKind::Update,
            "delete" => DeltaKind::Delete,
            other => return Err(DeltaErrorKind::UnknownType(shorten(other))),
        },
        Some(other) => return Err(DeltaErrorKind::TypeNotString(type_name(other))),
    };
    match map.get("model") {
        None => return Err(DeltaErrorKind::MissingField("model")),
        Some(Value::String(_)) => {}
        Some(other) => return Err(DeltaErrorKind::ModelNotString(type_name(other))),
    }
    let rows: &[&'static str] = match kind {
        DeltaKind::Insert | DeltaKind::Delete => &["data"],
        DeltaKind::Update => &["newData", "oldData"],
    };
    for &field in rows {
        match map.get(field) {
            None => return Err(DeltaErrorKind::MissingField(field)),
            Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(DeltaErrorKind::DataNotObject {
                    field,
                    got: type_name(other),
                });
            }
        }
    }
    Ok(kind)
}

/// What one subscription is sent for one delta. Borrowed from the [`Delta`]: one delta yields at
/// most three different `OutDelta`s (its update, the insert of newData, the delete of oldData),
/// so a caller can encode each once, keyed by [`kind`](Self::kind), and share the bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutDelta<'a> {
    Insert {
        model: &'a str,
        data: &'a Value,
    },
    Update {
        model: &'a str,
        new_data: &'a Value,
        old_data: &'a Value,
    },
    Delete {
        model: &'a str,
        data: &'a Value,
    },
}

impl<'a> OutDelta<'a> {
    pub fn kind(&self) -> DeltaKind {
        match self {
            OutDelta::Insert { .. } => DeltaKind::Insert,
            OutDelta::Update { .. } => DeltaKind::Update,
            OutDelta::Delete { .. } => DeltaKind::Delete,
        }
    }

    /// The Snorky wire form: `{"type":"update","model":M,"newData":..,"oldData":..}` and
    /// `{"type":"insert"|"delete","model":M,"data":..}`. `OutDelta` also implements `Serialize`
    /// with the same form, to write it without building a `Value`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("type".into(), Value::from(self.kind().as_str()));
        match *self {
            OutDelta::Insert { model, data } | OutDelta::Delete { model, data } => {
                map.insert("model".into(), Value::from(model));
                map.insert("data".into(), data.clone());
            }
            OutDelta::Update {
                model,
                new_data,
                old_data,
            } => {
                map.insert("model".into(), Value::from(model));
                map.insert("newData".into(), new_data.clone());
                map.insert("oldData".into(), old_data.clone());
            }
        }
        Value::Object(map)
    }

    /// What an update becomes for a subscription, given whether its query matches the old and
    /// the new row (the table in the module doc).
    pub fn for_update(
        model: &'a str,
        new_data: &'a Value,
        old_data: &'a Value,
        matches_old: bool,
        matches_new: bool,
    ) -> Option<Self> {
        match (matches_old, matches_new) {
            (true, true) => Some(OutDelta::Update {
                model,
                new_data,
                old_data,
            }),
            (false, true) => Some(OutDelta::Insert {
                model,
                data: new_data,
            }),
            (true, false) => Some(OutDelta::Delete {
                model,
                data: old_data,
            }),
            (false, false) => None,
        }
    }
}

impl Serialize for OutDelta<'_> {
    fn serialize<Ser: Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        let mut map = serializer.serialize_map(Some(if self.kind() == DeltaKind::Update {
            4
        } else {
            3
        }))?;
        map.serialize_entry("type", self.kind().as_str())?;
        match self {
            OutDelta::Insert { model, data } | OutDelta::Delete { model, data } => {
                map.serialize_entry("model", model)?;
                map.serialize_entry("data", data)?;
            }
            OutDelta::Update {
                model,
                new_data,
                old_data,
            } => {
                map.serialize_entry("model", model)?;
                map.serialize_entry("newData", new_data)?;
                map.serialize_entry("oldData", old_data)?;
            }
        }
        map.end()
    }
}

// ---- the index ----

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    #[error("no such dealer '{0}'")]
    UnknownDealer(String),
    #[error("dealer '{dealer}': {error}")]
    BadFilter { dealer: String, error: FilterError },
    #[error("dealer '{dealer}': the key is too complex: {limit}")]
    KeyTooComplex {
        dealer: String,
        limit: ComplexityLimit,
    },
    #[error("subscription {0} already exists")]
    DuplicateSubscription(SubId),
}

/// A query checked and compiled for one dealer of one [`LiveIndex`], ready to
/// [`insert`](LiveIndex::insert). Preparing every item of a request before inserting any lets a
/// bad item reject the whole request.
#[derive(Debug, Clone)]
pub struct LiveQuery {
    dealer: usize,
    dealer_name: String,
    kind: QueryKind,
}

#[derive(Debug, Clone)]
enum QueryKind {
    Broadcast,
    Key(Value),
    /// The filter's JSON (to group identical filters) and its compiled form.
    Filter(Value, Filter),
}

impl LiveQuery {
    pub fn dealer(&self) -> &str {
        &self.dealer_name
    }
}

/// The live subscriptions of one node: dealers (fixed at creation), and per dealer the
/// subscriptions with their handles `S` (whatever the server needs to reach the subscriber).
pub struct LiveIndex<S> {
    dealers: Box<[Dealer]>,
    by_name: HashMap<String, usize>,
    by_model: HashMap<String, Vec<usize>>,
    state: RwLock<State<S>>,
}

struct State<S> {
    /// One per dealer, same index.
    tables: Vec<Table<S>>,
    /// Each subscription's dealer and the value its table is keyed by (the key, the filter's
    /// JSON, or null for broadcast), to remove it.
    subs: HashMap<SubId, (usize, Value)>,
}

enum Table<S> {
    Broadcast(HashMap<SubId, S>),
    Key {
        field: FieldPath,
        keys: ValueMap<HashMap<SubId, S>>,
    },
    Filter(ValueMap<FilterGroup<S>>),
}

/// The subscriptions of one filter dealer that share a filter.
struct FilterGroup<S> {
    filter: Filter,
    subs: HashMap<SubId, S>,
}

impl<S> LiveIndex<S> {
    /// An index for these dealers. Names must be unique and non-empty, models non-empty.
    pub fn new(dealers: Vec<Dealer>) -> Result<Self, DealerError> {
        let mut by_name = HashMap::new();
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        let mut tables = Vec::with_capacity(dealers.len());
        for (i, dealer) in dealers.iter().enumerate() {
            check_names(&dealer.name, &dealer.model)?;
            if by_name.insert(dealer.name.clone(), i).is_some() {
                return Err(DealerError::Duplicate(dealer.name.clone()));
            }
            by_model.entry(dealer.model.clone()).or_default().push(i);
            tables.push(match &dealer.kind {
                DealerKind::Broadcast => Table::Broadcast(HashMap::new()),
                DealerKind::Key { field } => Table::Key {
                    field: field.clone(),
                    keys: ValueMap::new(),
                },
                DealerKind::Filter => Table::Filter(ValueMap::new()),
            });
        }
        Ok(Self {
            dealers: dealers.into(),
            by_name,
            by_model,
            state: RwLock::new(State {
                tables,
                subs: HashMap::new(),
            }),
        })
    }

    /// An index for configured dealers ([`DealerConfig::validate`] each, then [`new`](Self::new)).
    pub fn from_config(configs: &[DealerConfig]) -> Result<Self, DealerError> {
        let dealers = configs
            .iter()
            .map(DealerConfig::validate)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(dealers)
    }

    pub fn dealers(&self) -> &[Dealer] {
        &self.dealers
    }

    pub fn dealer(&self, name: &str) -> Option<&Dealer> {
        self.by_name.get(name).and_then(|&i| self.dealers.get(i))
    }

    /// Whether some dealer deals this model's deltas. A delta of any other model reaches nobody.
    pub fn knows_model(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    /// Checks `query` for the dealer `dealer` and compiles it: an unknown dealer, a bad filter
    /// or a key beyond the filter limits are refused here, never when a delta arrives. Broadcast
    /// dealers ignore the query.
    pub fn prepare(&self, dealer: &str, query: &Value) -> Result<LiveQuery, LiveError> {
        let Some((index, d)) = self
            .by_name
            .get(dealer)
            .and_then(|&i| Some((i, self.dealers.get(i)?)))
        else {
            return Err(LiveError::UnknownDealer(shorten(dealer)));
        };
        let kind = match &d.kind {
            DealerKind::Broadcast => QueryKind::Broadcast,
            DealerKind::Key { .. } => {
                filter::check_constant(query).map_err(|limit| LiveError::KeyTooComplex {
                    dealer: d.name.clone(),
                    limit,
                })?;
                QueryKind::Key(query.clone())
            }
            DealerKind::Filter => {
                let compiled = Filter::compile(query).map_err(|error| LiveError::BadFilter {
                    dealer: d.name.clone(),
                    error,
                })?;
                QueryKind::Filter(query.clone(), compiled)
            }
        };
        Ok(LiveQuery {
            dealer: index,
            dealer_name: d.name.clone(),
            kind,
        })
    }

    /// Adds a prepared subscription. Refused when `id` is already in use (the handle is dropped).
    pub fn insert(&self, id: SubId, query: LiveQuery, handle: S) -> Result<(), LiveError> {
        if self
            .dealers
            .get(query.dealer)
            .is_none_or(|d| d.name != query.dealer_name)
        {
            // Prepared by another index.
            return Err(LiveError::UnknownDealer(query.dealer_name));
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let State { tables, subs } = &mut *state;
        if subs.contains_key(&id) {
            return Err(LiveError::DuplicateSubscription(id));
        }
        let unknown = || LiveError::UnknownDealer(query.dealer_name.clone());
        let table = tables.get_mut(query.dealer).ok_or_else(unknown)?;
        let key = match (query.kind, table) {
            (QueryKind::Broadcast, Table::Broadcast(all)) => {
                all.insert(id, handle);
                Value::Null
            }
            (QueryKind::Key(key), Table::Key { keys, .. }) => {
                keys.get_or_insert_with(key.clone(), HashMap::new)
                    .insert(id, handle);
                key
            }
            (QueryKind::Filter(json, filter), Table::Filter(groups)) => {
                groups
                    .get_or_insert_with(json.clone(), || FilterGroup {
                        filter,
                        subs: HashMap::new(),
                    })
                    .subs
                    .insert(id, handle);
                json
            }
            _ => return Err(unknown()),
        };
        subs.insert(id, (query.dealer, key));
        Ok(())
    }

    /// [`prepare`](Self::prepare) and [`insert`](Self::insert).
    pub fn add(&self, id: SubId, dealer: &str, query: &Value, handle: S) -> Result<(), LiveError> {
        let query = self.prepare(dealer, query)?;
        self.insert(id, query, handle)
    }

    /// Removes a subscription and returns its handle, or `None` if there was none.
    pub fn remove(&self, id: SubId) -> Option<S> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let State { tables, subs } = &mut *state;
        let (dealer, key) = subs.remove(&id)?;
        match tables.get_mut(dealer)? {
            Table::Broadcast(all) => all.remove(&id),
            Table::Key { keys, .. } => {
                let group = keys.get_mut(&key)?;
                let handle = group.remove(&id);
                if group.is_empty() {
                    keys.remove(&key);
                }
                handle
            }
            Table::Filter(groups) => {
                let group = groups.get_mut(&key)?;
                let handle = group.subs.remove(&id);
                if group.subs.is_empty() {
                    groups.remove(&key);
                }
                handle
            }
        }
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .subs
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `send(id, handle, what)` for every subscription `delta` reaches, with what to send
    /// it (see the module doc), and returns how many calls it made. Dealer by dealer; the order
    /// within a dealer is unspecified. Runs under the read lock and never allocates.
    pub fn route<F>(&self, delta: &Delta, mut send: F) -> usize
    where
        F: FnMut(SubId, &S, &OutDelta<'_>),
    {
        let Some(dealers) = self.by_model.get(delta.model()) else {
            return 0;
        };
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let mut sent = 0;
        for &dealer in dealers {
            sent += match state.tables.get(dealer) {
                None => 0,
                Some(Table::Broadcast(all)) => deliver(all, &delta.as_out(), &mut send),
                Some(Table::Key { field, keys }) => route_key(field, keys, delta, &mut send),
                Some(Table::Filter(groups)) => route_filter(groups, delta, &mut send),
            };
        }
        sent
    }
}

fn deliver<S, F>(subs: &HashMap<SubId, S>, out: &OutDelta<'_>, send: &mut F) -> usize
where
    F: FnMut(SubId, &S, &OutDelta<'_>),
{
    for (id, handle) in subs {
        send(*id, handle, out);
    }
    subs.len()
}

fn route_key<S, F>(
    field: &FieldPath,
    keys: &ValueMap<HashMap<SubId, S>>,
    delta: &Delta,
    send: &mut F,
) -> usize
where
    F: FnMut(SubId, &S, &OutDelta<'_>),
{
    let group = |row: &Value| field.lookup(row).and_then(|key| keys.get(key));
    match delta {
        Delta::Insert { data, .. } | Delta::Delete { data, .. } => {
            group(data).map_or(0, |subs| deliver(subs, &delta.as_out(), send))
        }
        Delta::Update {
            model,
            new_data,
            old_data,
        } => match (group(old_data), group(new_data)) {
            // The same key before and after: one group, which matches both rows.
            (Some(old), Some(new)) if std::ptr::eq(old, new) => deliver(old, &delta.as_out(), send),
            (old, new) => {
                let mut sent = 0;
                if let Some(old) = old {
                    let out = OutDelta::for_update(model, new_data, old_data, true, false);
                    sent += out.map_or(0, |out| deliver(old, &out, send));
                }
                if let Some(new) = new {
                    let out = OutDelta::for_update(model, new_data, old_data, false, true);
                    sent += out.map_or(0, |out| deliver(new, &out, send));
                }
                sent
            }
        },
    }
}

fn route_filter<S, F>(groups: &ValueMap<FilterGroup<S>>, delta: &Delta, send: &mut F) -> usize
where
    F: FnMut(SubId, &S, &OutDelta<'_>),
{
    let mut sent = 0;
    match delta {
        Delta::Insert { data, .. } | Delta::Delete { data, .. } => {
            let out = delta.as_out();
            for group in groups.values() {
                if group.filter.matches(data) {
                    sent += deliver(&group.subs, &out, send);
                }
            }
        }
        Delta::Update {
            model,
            new_data,
            old_data,
        } => {
            for group in groups.values() {
                let old = group.filter.matches(old_data);
                let new = group.filter.matches(new_data);
                if let Some(out) = OutDelta::for_update(model, new_data, old_data, old, new) {
                    sent += deliver(&group.subs, &out, send);
                }
            }
        }
    }
    sent
}

// ---- a map keyed by JSON values under filter equality ----

/// JSON value → `T`, where keys that are [equal](filter::values_equal) are the same key (`1` and
/// `1.0` included). Looking a value up hashes it without allocating.
struct ValueMap<T> {
    hasher: RandomState,
    buckets: HashMap<u64, Vec<(Value, T)>, BuildHasherDefault<PreHashed>>,
}

impl<T> ValueMap<T> {
    fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            buckets: HashMap::default(),
        }
    }

    fn hash(&self, key: &Value) -> u64 {
        filter::canonical_hash(key, &self.hasher)
    }

    fn get(&self, key: &Value) -> Option<&T> {
        self.buckets
            .get(&self.hash(key))?
            .iter()
            .find(|(k, _)| filter::values_equal(k, key))
            .map(|(_, t)| t)
    }

    fn get_mut(&mut self, key: &Value) -> Option<&mut T> {
        let hash = self.hash(key);
        self.buckets
            .get_mut(&hash)?
            .iter_mut()
            .find(|(k, _)| filter::values_equal(k, key))
            .map(|(_, t)| t)
    }

    fn get_or_insert_with(&mut self, key: Value, make: impl FnOnce() -> T) -> &mut T {
        let hash = self.hash(&key);
        let bucket = self.buckets.entry(hash).or_default();
        let i = match bucket
            .iter()
            .position(|(k, _)| filter::values_equal(k, &key))
        {
            Some(i) => i,
            None => {
                bucket.push((key, make()));
                bucket.len() - 1
            }
        };
        &mut bucket[i].1
    }

    fn remove(&mut self, key: &Value) -> Option<T> {
        let hash = self.hash(key);
        let bucket = self.buckets.get_mut(&hash)?;
        let i = bucket
            .iter()
            .position(|(k, _)| filter::values_equal(k, key))?;
        let (_, t) = bucket.swap_remove(i);
        if bucket.is_empty() {
            self.buckets.remove(&hash);
        }
        Some(t)
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.buckets.values().flatten().map(|(_, t)| t)
    }
}

/// The `buckets` map's keys are already hashes: use them as they are.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::tests::{filter_expr, json_value, ref_eq, reference, row, scalar};
    use proptest::prelude::*;
    use serde_json::json;

    fn dealer(name: &str, model: &str, kind: DealerKind) -> Dealer {
        Dealer {
            name: name.into(),
            model: model.into(),
            kind,
        }
    }

    fn key(field: &str) -> DealerKind {
        DealerKind::Key {
            field: FieldPath::parse(field).unwrap(),
        }
    }

    /// Snorky's todo setup: three dealers on `Task`, one on `Note`.
    fn index() -> LiveIndex<&'static str> {
        LiveIndex::new(vec![
            dealer("AllTasks", "Task", DealerKind::Broadcast),
            dealer("TasksByColor", "Task", key("color")),
            dealer("FilteredTasks", "Task", DealerKind::Filter),
            dealer("AllNotes", "Note", DealerKind::Broadcast),
        ])
        .unwrap()
    }

    /// Routes and returns `(id, kind, data)` sorted, where data is the row sent (newData for an
    /// update).
    fn routed(index: &LiveIndex<&'static str>, delta: &Delta) -> Vec<(SubId, DeltaKind, Value)> {
        let mut out = vec![];
        let n = index.route(delta, |id, _, d| {
            let data = match *d {
                OutDelta::Insert { data, .. } | OutDelta::Delete { data, .. } => data.clone(),
                OutDelta::Update { new_data, .. } => new_data.clone(),
            };
            out.push((id, d.kind(), data));
        });
        assert_eq!(n, out.len());
        out.sort_by_key(|(id, _, _)| *id);
        out
    }

    fn update(old: Value, new: Value) -> Delta {
        Delta::Update {
            model: "Task".into(),
            new_data: new,
            old_data: old,
        }
    }

    #[test]
    fn dealer_config_parses_and_validates() {
        let c: DealerConfig = serde_json::from_value(
            json!({"name": "TasksByColor", "model": "Task", "kind": "key", "key": "owner.color"}),
        )
        .unwrap();
        assert_eq!(
            c.validate().unwrap(),
            dealer("TasksByColor", "Task", key("owner.color"))
        );
        let c: DealerConfig =
            serde_json::from_value(json!({"name": "All", "model": "Task", "kind": "broadcast"}))
                .unwrap();
        assert_eq!(c.validate().unwrap().kind, DealerKind::Broadcast);
        assert!(
            serde_json::from_value::<DealerConfig>(
                json!({"name": "A", "model": "T", "kind": "simple"})
            )
            .is_err()
        );
        assert!(
            serde_json::from_value::<DealerConfig>(
                json!({"name": "A", "model": "T", "kind": "filter", "query": 1})
            )
            .is_err(),
            "unknown fields"
        );
        let cfg = |name: &str, model: &str, kind, key: Option<&str>| DealerConfig {
            name: name.into(),
            model: model.into(),
            kind,
            key: key.map(Into::into),
        };
        use DealerKindName as K;
        for (c, want) in [
            (
                cfg("A", "T", K::Key, None),
                "dealer 'A': a key dealer needs `key`, the field to match (e.g. key = \"color\")",
            ),
            (
                cfg("A", "T", K::Filter, Some("x")),
                "dealer 'A': `key` is only for key dealers",
            ),
            (
                cfg("A", "T", K::Key, Some("a..b")),
                "dealer 'A': key: field 'a..b' has an empty segment",
            ),
            (
                cfg("", "T", K::Broadcast, None),
                "a dealer's name must not be empty",
            ),
            (
                cfg("A", "", K::Broadcast, None),
                "dealer 'A': model must not be empty",
            ),
        ] {
            assert_eq!(c.validate().unwrap_err().to_string(), want);
        }
        let twice = [
            cfg("A", "T", K::Broadcast, None),
            cfg("A", "U", K::Filter, None),
        ];
        assert_eq!(
            LiveIndex::<()>::from_config(&twice)
                .err()
                .unwrap()
                .to_string(),
            "dealer 'A' is declared twice"
        );
    }

    #[test]
    fn deltas_parse() {
        let d = Delta::from_json(
            &json!({"type": "insert", "model": "Task", "data": {"id": 1}, "tag": "x"}),
        )
        .unwrap();
        assert_eq!(
            d,
            Delta::Insert {
                model: "Task".into(),
                data: json!({"id": 1})
            }
        );
        let u = json!({"type": "update", "model": "Task", "newData": {"id": 1, "c": "red"}, "oldData": {"id": 1, "c": "blue"}});
        let d = Delta::from_value(u.clone()).unwrap();
        assert_eq!(d.kind(), DeltaKind::Update);
        assert_eq!(d.to_json(), u, "round trip");
        assert_eq!(serde_json::to_value(d.as_out()).unwrap(), u, "Serialize");
        let del = json!({"type": "delete", "model": "Task", "data": {"id": 1}});
        assert_eq!(Delta::from_json(&del).unwrap().to_json(), del);
        assert_eq!(
            serde_json::to_value(Delta::from_json(&del).unwrap().as_out()).unwrap(),
            del
        );
    }

    #[test]
    fn bad_deltas_are_named() {
        for (bad, want) in [
            (json!([1]), "a delta must be a JSON object, got an array"),
            (json!({"model": "T", "data": {}}), "missing field 'type'"),
            (
                json!({"type": 1, "model": "T", "data": {}}),
                "'type' must be a string, got a number",
            ),
            (
                json!({"type": "upsert", "model": "T", "data": {}}),
                "unknown delta type 'upsert' (expected insert, update or delete)",
            ),
            (
                json!({"type": "insert", "data": {}}),
                "missing field 'model'",
            ),
            (
                json!({"type": "insert", "model": 3, "data": {}}),
                "model must be a string, got a number",
            ),
            (
                json!({"type": "insert", "model": "T"}),
                "missing field 'data'",
            ),
            (
                json!({"type": "delete", "model": "T", "data": [1]}),
                "'data' must be an object (a row), got an array",
            ),
            (
                json!({"type": "update", "model": "T", "newData": {}}),
                "missing field 'oldData'",
            ),
            (
                json!({"type": "update", "model": "T", "oldData": {}}),
                "missing field 'newData'",
            ),
            (
                json!({"type": "update", "model": "T", "newData": {}, "oldData": null}),
                "'oldData' must be an object (a row), got null",
            ),
        ] {
            assert_eq!(
                Delta::from_json(&bad).unwrap_err().to_string(),
                want,
                "{bad}"
            );
            assert_eq!(
                Delta::from_value(bad.clone()).unwrap_err().to_string(),
                want,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_batch_is_rejected_by_its_first_bad_item() {
        let good = json!({"type": "insert", "model": "T", "data": {}});
        let batch = vec![
            good.clone(),
            good.clone(),
            good.clone(),
            json!({"type": "upsert", "model": "T", "data": {}}),
            json!(1),
        ];
        let want = "item 3: unknown delta type 'upsert' (expected insert, update or delete)";
        let e = validate_batch(&batch).unwrap_err();
        assert_eq!(e.item, Some(3));
        assert_eq!(e.to_string(), want);
        assert_eq!(parse_batch(batch).unwrap_err().to_string(), want);
        assert_eq!(
            validate_batch(&[good.clone(), good.clone()]).unwrap().len(),
            2
        );
        assert_eq!(parse_batch(vec![good.clone()]).unwrap().len(), 1);
        assert!(validate_batch(&[]).unwrap().is_empty());
    }

    #[test]
    fn queries_are_checked_when_added() {
        let idx = index();
        assert_eq!(
            idx.add(1, "Nope", &json!(null), "a")
                .unwrap_err()
                .to_string(),
            "no such dealer 'Nope'"
        );
        assert_eq!(
            idx.add(1, "FilteredTasks", &json!(["xor"]), "a")
                .unwrap_err()
                .to_string(),
            "dealer 'FilteredTasks': unknown operator 'xor'"
        );
        assert_eq!(
            idx.add(1, "FilteredTasks", &json!(null), "a")
                .unwrap_err()
                .to_string(),
            "dealer 'FilteredTasks': expected a filter like [\"==\", field, value], got null"
        );
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        assert_eq!(
            idx.add(1, "TasksByColor", &deep, "a")
                .unwrap_err()
                .to_string(),
            "dealer 'TasksByColor': the key is too complex: deeper than 32 levels"
        );
        assert!(idx.is_empty());
        idx.add(1, "AllTasks", &json!({"anything": "ignored"}), "a")
            .unwrap();
        assert_eq!(
            idx.add(1, "TasksByColor", &json!("red"), "b").unwrap_err(),
            LiveError::DuplicateSubscription(1)
        );
        assert_eq!(idx.len(), 1);
        // A query prepared by another index is refused.
        let other =
            LiveIndex::<&str>::new(vec![dealer("Other", "Task", DealerKind::Broadcast)]).unwrap();
        let q = other.prepare("Other", &json!(null)).unwrap();
        assert_eq!(q.dealer(), "Other");
        assert!(idx.insert(2, q, "c").is_err());
    }

    #[test]
    fn update_routing_table_snorky_s7() {
        // A key dealer on color (query "red") and a broadcast dealer.
        let idx = index();
        idx.add(1, "TasksByColor", &json!("red"), "k").unwrap();
        idx.add(2, "AllTasks", &json!(null), "b").unwrap();
        let (blue, red, green) = (
            json!({"id": 1, "color": "blue"}),
            json!({"id": 1, "color": "red"}),
            json!({"id": 1, "color": "green"}),
        );
        assert_eq!(
            routed(&idx, &update(blue.clone(), red.clone())),
            vec![
                (1, DeltaKind::Insert, red.clone()),
                (2, DeltaKind::Update, red.clone())
            ]
        );
        assert_eq!(
            routed(&idx, &update(red.clone(), red.clone())),
            vec![
                (1, DeltaKind::Update, red.clone()),
                (2, DeltaKind::Update, red.clone())
            ]
        );
        assert_eq!(
            routed(&idx, &update(red.clone(), green.clone())),
            vec![
                (1, DeltaKind::Delete, red.clone()),
                (2, DeltaKind::Update, green.clone())
            ]
        );
        assert_eq!(
            routed(&idx, &update(blue.clone(), green.clone())),
            vec![(2, DeltaKind::Update, green.clone())]
        );
        // Two items of one client that both match get the delta twice.
        idx.add(3, "TasksByColor", &json!("red"), "k").unwrap();
        assert_eq!(routed(&idx, &update(red.clone(), red.clone())).len(), 3);
    }

    #[test]
    fn update_routing_table_filter_snorky_s8() {
        let idx = index();
        let q = json!(["and", [">=", "prio", 3], ["not", ["==", "done", true]]]);
        idx.add(1, "FilteredTasks", &q, "f").unwrap();
        let hit = json!({"prio": 5, "done": false});
        let miss = json!({"prio": 5, "done": true});
        let cases = [
            (
                hit.clone(),
                hit.clone(),
                Some((DeltaKind::Update, hit.clone())),
            ),
            (
                miss.clone(),
                hit.clone(),
                Some((DeltaKind::Insert, hit.clone())),
            ),
            (
                hit.clone(),
                miss.clone(),
                Some((DeltaKind::Delete, hit.clone())),
            ),
            (miss.clone(), miss.clone(), None),
        ];
        for (old, new, want) in cases {
            let got = routed(&idx, &update(old, new));
            assert_eq!(
                got,
                want.into_iter().map(|(k, d)| (1, k, d)).collect::<Vec<_>>()
            );
        }
        // Inserts and deletes go unchanged to matching subscriptions.
        for (make, kind) in [
            (
                (|data| Delta::Insert {
                    model: "Task".into(),
                    data,
                }) as fn(Value) -> Delta,
                DeltaKind::Insert,
            ),
            (
                |data| Delta::Delete {
                    model: "Task".into(),
                    data,
                },
                DeltaKind::Delete,
            ),
        ] {
            assert_eq!(
                routed(&idx, &make(hit.clone())),
                vec![(1, kind, hit.clone())]
            );
            assert!(routed(&idx, &make(json!({"prio": "9"}))).is_empty());
            assert!(routed(&idx, &make(json!({}))).is_empty());
        }
    }

    #[test]
    fn deltas_go_only_to_dealers_of_their_model() {
        let idx = index();
        idx.add(1, "AllTasks", &json!(null), "t").unwrap();
        idx.add(2, "AllNotes", &json!(null), "n").unwrap();
        let note = Delta::Insert {
            model: "Note".into(),
            data: json!({}),
        };
        assert_eq!(routed(&idx, &note), vec![(2, DeltaKind::Insert, json!({}))]);
        let other = Delta::Insert {
            model: "Other".into(),
            data: json!({}),
        };
        assert!(routed(&idx, &other).is_empty());
        assert!(idx.knows_model("Task") && idx.knows_model("Note") && !idx.knows_model("Other"));
    }

    #[test]
    fn key_routing_uses_filter_equality_and_paths() {
        let idx = LiveIndex::new(vec![dealer("ByOwner", "Task", key("owner.id"))]).unwrap();
        idx.add(1, "ByOwner", &json!(7), "a").unwrap();
        idx.add(2, "ByOwner", &json!(7.0), "b").unwrap();
        idx.add(3, "ByOwner", &json!("7"), "c").unwrap();
        idx.add(4, "ByOwner", &json!({"x": [1, 2]}), "d").unwrap();
        let ins = |data| Delta::Insert {
            model: "Task".into(),
            data,
        };
        let ids = |d: &Delta| routed(&idx, d).into_iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(ids(&ins(json!({"owner": {"id": 7}}))), vec![1, 2]);
        assert_eq!(ids(&ins(json!({"owner": {"id": "7"}}))), vec![3]);
        assert_eq!(
            ids(&ins(json!({"owner": {"id": {"x": [1.0, 2]}}}))),
            vec![4]
        );
        assert!(ids(&ins(json!({"owner": 7}))).is_empty(), "missing field");
        assert!(ids(&ins(json!({"id": 7}))).is_empty());
        // Moving between two keys that are equal (7 -> 7.0) is an update.
        let u = update(json!({"owner": {"id": 7}}), json!({"owner": {"id": 7.0}}));
        let kinds: Vec<_> = routed(&idx, &u).into_iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(kinds, vec![(1, DeltaKind::Update), (2, DeltaKind::Update)]);
    }

    #[test]
    fn remove_and_identical_filters_share_a_group() {
        let idx = index();
        let q = json!(["==", "color", "red"]);
        idx.add(1, "FilteredTasks", &q, "a").unwrap();
        idx.add(2, "FilteredTasks", &json!(["==", "color", "red"]), "b")
            .unwrap();
        idx.add(3, "TasksByColor", &json!("red"), "c").unwrap();
        idx.add(4, "TasksByColor", &json!("red"), "d").unwrap();
        idx.add(5, "AllTasks", &json!(null), "e").unwrap();
        {
            let state = idx.state.read().unwrap();
            let Table::Filter(groups) = &state.tables[2] else {
                panic!()
            };
            assert_eq!(groups.values().count(), 1, "one group for one filter");
        }
        let red = Delta::Insert {
            model: "Task".into(),
            data: json!({"color": "red"}),
        };
        assert_eq!(routed(&idx, &red).len(), 5);
        assert_eq!(idx.remove(1), Some("a"));
        assert_eq!(idx.remove(1), None);
        assert_eq!(idx.remove(3), Some("c"));
        assert_eq!(idx.remove(5), Some("e"));
        let ids: Vec<_> = routed(&idx, &red).into_iter().map(|r| r.0).collect();
        assert_eq!(ids, vec![2, 4]);
        assert_eq!(idx.remove(2), Some("b"));
        assert_eq!(idx.remove(4), Some("d"));
        assert!(idx.is_empty());
        let state = idx.state.read().unwrap();
        for table in &state.tables {
            match table {
                Table::Broadcast(all) => assert!(all.is_empty()),
                Table::Key { keys, .. } => assert!(keys.buckets.is_empty()),
                Table::Filter(groups) => assert!(groups.buckets.is_empty()),
            }
        }
        // The id is free again.
        drop(state);
        idx.add(1, "AllTasks", &json!(null), "again").unwrap();
    }

    #[test]
    fn the_index_is_shared_between_threads() {
        fn is_sync<T: Sync + Send>() {}
        is_sync::<LiveIndex<std::sync::Arc<str>>>();
    }

    /// A pool of key values where equal-but-different representations are common.
    fn key_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!(1)),
            Just(json!(1.0)),
            Just(json!("1")),
            Just(json!(true)),
            Just(json!(0)),
            Just(json!(-0.0)),
            Just(json!(null)),
            Just(json!([1, "a"])),
            Just(json!([1.0, "a"])),
            Just(json!({"a": 1, "b": 2})),
            Just(json!({"b": 2.0, "a": 1})),
            scalar(),
        ]
    }

    fn key_row() -> impl Strategy<Value = Value> {
        proptest::option::weighted(0.9, key_value()).prop_map(|k| match k {
            Some(k) => json!({"id": 1, "k": k}),
            None => json!({"id": 1}),
        })
    }

    proptest! {
        /// (b) For a filter dealer, a key dealer and a broadcast dealer, the kind of delta each
        /// subscription gets for an update follows the routing table.
        #[test]
        fn update_routing_follows_the_table(expr in filter_expr(), old in row(), new in row(), k in json_value()) {
            let idx = LiveIndex::new(vec![
                dealer("F", "M", DealerKind::Filter),
                dealer("K", "M", key("a")),
                dealer("B", "M", DealerKind::Broadcast),
            ]).unwrap();
            idx.add(1, "F", &expr, ()).unwrap();
            idx.add(2, "K", &k, ()).unwrap();
            idx.add(3, "B", &json!(null), ()).unwrap();
            let delta = Delta::Update { model: "M".into(), new_data: new.clone(), old_data: old.clone() };
            let mut got = HashMap::new();
            idx.route(&delta, |id, _, out| {
                let data = match *out {
                    OutDelta::Insert { data, .. } | OutDelta::Delete { data, .. } => data,
                    OutDelta::Update { new_data, old_data, .. } => {
                        assert_eq!((new_data, old_data), (&new, &old));
                        new_data
                    }
                };
                assert!(got.insert(id, (out.kind(), data.clone())).is_none());
            });
            let key_matches = |row: &Value| row.get("a").is_some_and(|a| ref_eq(a, &k));
            let expect = |m_old: bool, m_new: bool| match (m_old, m_new) {
                (true, true) => Some((DeltaKind::Update, new.clone())),
                (false, true) => Some((DeltaKind::Insert, new.clone())),
                (true, false) => Some((DeltaKind::Delete, old.clone())),
                (false, false) => None,
            };
            prop_assert_eq!(got.get(&1).cloned(), expect(reference(&expr, &old), reference(&expr, &new)));
            prop_assert_eq!(got.get(&2).cloned(), expect(key_matches(&old), key_matches(&new)));
            prop_assert_eq!(got.get(&3).cloned(), Some((DeltaKind::Update, new.clone())));
        }

        /// (c) After random adds and removes, key routing reaches exactly the subscriptions whose
        /// key equals the row's field (a brute-force scan), for inserts, deletes and updates.
        #[test]
        fn key_routing_matches_a_scan(
            ops in proptest::collection::vec((any::<bool>(), 0u64..40, key_value()), 1..120),
            rows in proptest::collection::vec((key_row(), key_row()), 1..8),
        ) {
            let idx = LiveIndex::new(vec![dealer("K", "M", key("k"))]).unwrap();
            let mut model: HashMap<SubId, Value> = HashMap::new();
            for (add, id, k) in ops {
                if add {
                    let r = idx.add(id, "K", &k, id);
                    prop_assert_eq!(r.is_ok(), !model.contains_key(&id));
                    model.entry(id).or_insert(k);
                } else {
                    prop_assert_eq!(idx.remove(id), model.remove(&id).map(|_| id));
                }
            }
            prop_assert_eq!(idx.len(), model.len());
            let scan = |row: &Value| -> std::collections::BTreeSet<SubId> {
                let Some(v) = row.get("k") else { return Default::default() };
                model.iter().filter(|(_, k)| filter::values_equal(k, v)).map(|(id, _)| *id).collect()
            };
            for (old, new) in rows {
                let mut got = std::collections::BTreeSet::new();
                let ins = Delta::Insert { model: "M".into(), data: new.clone() };
                idx.route(&ins, |id, h, _| { assert_eq!(id, *h); assert!(got.insert(id)); });
                prop_assert_eq!(&got, &scan(&new));
                let mut got = std::collections::BTreeMap::new();
                idx.route(&update(old.clone(), new.clone()).with_model("M"), |id, _, out| {
                    assert!(got.insert(id, out.kind()).is_none());
                });
                let (in_old, in_new) = (scan(&old), scan(&new));
                let mut want = std::collections::BTreeMap::new();
                for id in in_old.union(&in_new) {
                    let kind = match (in_old.contains(id), in_new.contains(id)) {
                        (true, true) => DeltaKind::Update,
                        (false, true) => DeltaKind::Insert,
                        _ => DeltaKind::Delete,
                    };
                    want.insert(*id, kind);
                }
                prop_assert_eq!(got, want);
            }
        }
    }

    impl Delta {
        fn with_model(self, m: &str) -> Delta {
            match self {
                Delta::Update {
                    new_data, old_data, ..
                } => Delta::Update {
                    model: m.into(),
                    new_data,
                    old_data,
                },
                other => other,
            }
        }
    }
}
