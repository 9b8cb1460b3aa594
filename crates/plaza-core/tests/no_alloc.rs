//! `Filter::matches` and `LiveIndex::route` must not allocate: they run once per subscription (or
//! per distinct filter) per row change. A counting global allocator proves it.
//!
//! The count is per thread, so the test harness's other threads do not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use plaza_core::Filter;
use plaza_core::filter::FieldPath;
use plaza_core::live::{Dealer, DealerKind, Delta, LiveIndex, OutDelta};
use serde_json::{Value, json};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn rows() -> Vec<Value> {
    vec![
        json!({}),
        json!({"n": 5, "f": 2.5, "big": u64::MAX, "neg": i64::MIN, "s": "héllo", "b": true,
               "z": null, "a": [1, 2.0, {"x": "y"}], "o": {"p": {"q": [1]}, "c": "red"}}),
        json!({"n": "5", "s": 5, "b": 1, "a": {"x": 1}, "o": [1]}),
        json!([1, 2, 3]),
        json!("not a row"),
    ]
}

fn filters() -> Vec<Value> {
    vec![
        json!(["==", "n", 5]),
        json!(["==", "n", 5.0]),
        json!(["!=", "f", 2]),
        json!(["<", "big", 1e300]),
        json!([">=", "neg", -9.3e18]),
        json!(["<=", "s", "hz"]),
        json!([">", "s", "h"]),
        json!(["==", "b", true]),
        json!(["==", "z", null]),
        json!(["==", "a", [1.0, 2, {"x": "y"}]]),
        json!(["==", "o", {"c": "red", "p": {"q": [1.0]}}]),
        json!(["in", "o.c", ["blue", "red", 3, null, [1], {"k": 1}]]),
        json!(["==", "o.p.q", [1]]),
        json!(["==", "missing.path.here", 1]),
        json!([
            "and",
            ["==", "n", 5],
            ["or", ["not", ["==", "b", false]], ["or"]],
            ["and"]
        ]),
    ]
}

#[test]
fn matching_a_compiled_filter_never_allocates() {
    let compiled: Vec<Filter> = filters()
        .iter()
        .map(|f| Filter::compile(f).unwrap())
        .collect();
    let rows = rows();
    // The counter itself must see allocations, or a zero below would prove nothing.
    assert!(allocations(|| drop(std::hint::black_box(vec![1u8]))) >= 1);
    let mut hits = 0;
    let n = allocations(|| {
        for _ in 0..100 {
            for f in &compiled {
                for row in &rows {
                    hits += usize::from(f.matches(std::hint::black_box(row)));
                }
            }
        }
    });
    assert_eq!(n, 0, "allocations during matching");
    assert!(hits > 0);
}

#[test]
fn routing_a_delta_never_allocates() {
    let index = LiveIndex::<u64>::new(vec![
        Dealer {
            name: "All".into(),
            model: "Task".into(),
            kind: DealerKind::Broadcast,
        },
        Dealer {
            name: "ByColor".into(),
            model: "Task".into(),
            kind: DealerKind::Key {
                field: FieldPath::parse("o.c").unwrap(),
            },
        },
        Dealer {
            name: "Filtered".into(),
            model: "Task".into(),
            kind: DealerKind::Filter,
        },
    ])
    .unwrap();
    let mut id = 0;
    for _ in 0..3 {
        index.add(id, "All", &json!(null), id).unwrap();
        id += 1;
        for key in [
            json!("red"),
            json!("blue"),
            json!(1),
            json!([1]),
            json!({"a": 1}),
        ] {
            index.add(id, "ByColor", &key, id).unwrap();
            id += 1;
        }
        for f in filters() {
            index.add(id, "Filtered", &f, id).unwrap();
            id += 1;
        }
    }
    let rows = rows();
    let blue = json!({"o": {"c": "blue"}, "n": 5});
    let mut deltas = vec![];
    for row in &rows {
        deltas.push(Delta::Insert {
            model: "Task".into(),
            data: row.clone(),
        });
        deltas.push(Delta::Delete {
            model: "Task".into(),
            data: row.clone(),
        });
        deltas.push(Delta::Update {
            model: "Task".into(),
            new_data: row.clone(),
            old_data: blue.clone(),
        });
        deltas.push(Delta::Update {
            model: "Task".into(),
            new_data: blue.clone(),
            old_data: row.clone(),
        });
    }
    let mut sent = 0;
    let mut kinds = [0usize; 3];
    let n = allocations(|| {
        for delta in &deltas {
            sent += index.route(delta, |_, handle, out| {
                std::hint::black_box(handle);
                kinds[match out {
                    OutDelta::Insert { .. } => 0,
                    OutDelta::Update { .. } => 1,
                    OutDelta::Delete { .. } => 2,
                }] += 1;
            });
        }
    });
    assert_eq!(n, 0, "allocations during routing");
    assert!(kinds.iter().all(|k| *k > 0), "{kinds:?}");
    assert_eq!(sent, kinds.iter().sum::<usize>());
}
