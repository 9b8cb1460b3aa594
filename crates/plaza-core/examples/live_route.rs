//! Deltas routed per second by a `LiveIndex`, with N key subscriptions and N filter
//! subscriptions on one model (N = 1,000 and 10,000): key routing should not depend on N,
//! filter routing evaluates every distinct filter once per delta.
//!
//!     cargo run --release -p plaza-core --example live_route

use std::time::Instant;

use plaza_core::filter::FieldPath;
use plaza_core::live::{Dealer, DealerKind, Delta, LiveIndex};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dealer = |kind| Dealer {
        name: "D".into(),
        model: "Task".into(),
        kind,
    };
    println!("| subscriptions | dealer | deltas/s | sent per delta |");
    println!("|---:|---|---:|---:|");
    for subs in [1_000u64, 10_000] {
        let by_owner = LiveIndex::<u64>::new(vec![dealer(DealerKind::Key {
            field: FieldPath::parse("owner")?,
        })])?;
        let filtered = LiveIndex::<u64>::new(vec![dealer(DealerKind::Filter)])?;
        for i in 0..subs {
            by_owner.add(i, "D", &json!(i), i)?;
            filtered.add(
                i,
                "D",
                &json!(["and", ["==", "owner", i], [">=", "prio", 3]]),
                i,
            )?;
        }
        for (name, index, deltas) in [("key", &by_owner, 200_000u64), ("filter", &filtered, 2_000)]
        {
            // Updates that move a row from one owner to the next: a delete and an insert each.
            let batch: Vec<Delta> = (0..deltas)
                .map(|i| Delta::Update {
                    model: "Task".into(),
                    old_data: json!({"id": i, "owner": i % subs, "prio": 5}),
                    new_data: json!({"id": i, "owner": (i + 1) % subs, "prio": 5}),
                })
                .collect();
            let start = Instant::now();
            let mut sent = 0;
            for delta in &batch {
                sent += index.route(delta, |_, _, out| {
                    std::hint::black_box(out);
                });
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "| {subs} | {name} | {:.0} | {:.1} |",
                deltas as f64 / secs,
                sent as f64 / deltas as f64
            );
        }
    }
    Ok(())
}
