//! Behaviour of channel streams, written once against `dyn Store` and run on every
//! implementation, plus what only a durable store can show (restart, group commit).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use plaza_core::{ChannelName, Payload};
use plaza_store::{
    AppendListener, ManualClock, MemoryStore, Position, RedbStore, Store, StoreError, StreamAppend,
    StreamOptions, WriteBatch, WriteOutcome,
};
use tempfile::TempDir;

/// A store under test, with the clock it stamps publications with.
struct Fixture {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    _dir: Option<TempDir>,
}

fn start_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn memory() -> Fixture {
    let clock = Arc::new(ManualClock::new(start_time()));
    Fixture {
        store: Arc::new(MemoryStore::with_clock(clock.clone())),
        clock,
        _dir: None,
    }
}

async fn redb() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(start_time()));
    let store = RedbStore::open_with_clock(dir.path(), clock.clone())
        .await
        .expect("open redb store");
    Fixture {
        store: Arc::new(store),
        clock,
        _dir: Some(dir),
    }
}

/// Runs each behaviour test once per implementation.
macro_rules! for_each_store {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::memory()).await;
                }
            )*
        }
        mod redb_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::redb().await).await;
                }
            )*
        }
    };
}

for_each_store!(
    offsets_start_at_one_per_channel,
    read_since_middle_and_top,
    read_since_trimmed_is_incomplete,
    read_with_other_epoch_or_future_offset_is_incomplete,
    read_limits,
    read_creates_the_stream_it_reports,
    max_len_trims_on_append,
    max_len_zero_keeps_nothing,
    ttl_trims_by_age,
    payloads_round_trip,
    concurrent_appends_get_consecutive_offsets,
    listener_sees_every_append_in_offset_order,
    appends_are_ordered_by_call_not_by_await,
    write_batches_are_atomic_and_idempotent,
    key_value_get_and_scan,
);

fn ch(name: &str) -> ChannelName {
    ChannelName::parse(name, 255).expect("valid channel name")
}

fn json(text: &str) -> Payload {
    Payload::from_json_text(text.to_owned()).expect("valid JSON")
}

fn n(i: u64) -> Payload {
    json(&i.to_string())
}

fn unbounded() -> StreamOptions {
    StreamOptions::default()
}

fn at(epoch: &str, offset: u64) -> Option<Position> {
    Some(Position {
        epoch: epoch.to_owned(),
        offset,
    })
}

/// Appends `1..=count` as payloads, so payload i sits at offset i in a fresh stream.
async fn fill(
    store: &dyn Store,
    channel: &ChannelName,
    count: u64,
    options: StreamOptions,
) -> String {
    let mut epoch = String::new();
    for i in 1..=count {
        let pos = store.append(channel, n(i), options).await.expect("append");
        assert_eq!(pos.offset, i);
        epoch = pos.epoch;
    }
    epoch
}

/// The offsets of a result, checking each payload is the number of its offset (see `fill`).
fn offsets(publications: &[(u64, Payload)]) -> Vec<u64> {
    for (offset, data) in publications {
        assert_eq!(
            data.as_str(),
            offset.to_string(),
            "payload at offset {offset}"
        );
    }
    publications.iter().map(|(o, _)| *o).collect()
}

async fn offsets_start_at_one_per_channel(f: Fixture) {
    let s = &*f.store;
    let (a, b) = (ch("chat:a"), ch("chat:b"));
    assert_eq!(s.top(&a).await.unwrap(), None);
    let p1 = s.append(&a, n(1), unbounded()).await.unwrap();
    let p2 = s.append(&a, n(2), unbounded()).await.unwrap();
    let q1 = s.append(&b, n(1), unbounded()).await.unwrap();
    let p3 = s.append(&a, n(3), unbounded()).await.unwrap();
    assert_eq!((p1.offset, p2.offset, p3.offset, q1.offset), (1, 2, 3, 1));
    assert_eq!(p1.epoch, p2.epoch);
    assert_eq!(p1.epoch, p3.epoch);
    assert!(!p1.epoch.is_empty());
    // Each stream gets its own random epoch.
    assert_ne!(p1.epoch, q1.epoch);
    assert_eq!(s.top(&a).await.unwrap(), Some(p3));
    assert_eq!(s.top(&b).await.unwrap(), Some(q1));
    assert_eq!(s.stats().appends, 4);
}

async fn read_since_middle_and_top(f: Fixture) {
    let s = &*f.store;
    let c = ch("news");
    let epoch = fill(s, &c, 5, unbounded()).await;

    let r = s.read(&c, at(&epoch, 2), 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [3, 4, 5]);
    assert!(r.complete);
    assert_eq!(r.top, at(&epoch, 5).unwrap());

    let r = s.read(&c, at(&epoch, 0), 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [1, 2, 3, 4, 5]);
    assert!(r.complete);

    let r = s.read(&c, at(&epoch, 5), 100).await.unwrap();
    assert!(r.publications.is_empty());
    assert!(r.complete, "nothing missed at the top");
    assert_eq!(r.top.offset, 5);
}

async fn read_since_trimmed_is_incomplete(f: Fixture) {
    let s = &*f.store;
    let c = ch("news");
    let keep3 = StreamOptions {
        max_len: Some(3),
        ttl: None,
    };
    let epoch = fill(s, &c, 6, keep3).await;
    // Kept: 4, 5, 6. A client at 1 missed 2 and 3 for good.
    let r = s.read(&c, at(&epoch, 1), 100).await.unwrap();
    assert!(!r.complete);
    assert_eq!(
        offsets(&r.publications),
        [4, 5, 6],
        "what is left is still returned"
    );
    // A client at 3 missed nothing that was trimmed.
    let r = s.read(&c, at(&epoch, 3), 100).await.unwrap();
    assert!(r.complete);
    assert_eq!(offsets(&r.publications), [4, 5, 6]);
}

async fn read_with_other_epoch_or_future_offset_is_incomplete(f: Fixture) {
    let s = &*f.store;
    let c = ch("news");
    let epoch = fill(s, &c, 3, unbounded()).await;
    let r = s.read(&c, at("not-the-epoch", 1), 100).await.unwrap();
    assert!(!r.complete);
    assert!(r.publications.is_empty());
    assert_eq!(r.top, at(&epoch, 3).unwrap());
    let r = s.read(&c, at(&epoch, 9), 100).await.unwrap();
    assert!(
        !r.complete,
        "a position ahead of the stream cannot be trusted"
    );
    assert!(r.publications.is_empty());
}

async fn read_limits(f: Fixture) {
    let s = &*f.store;
    let c = ch("news");
    let epoch = fill(s, &c, 5, unbounded()).await;
    // A cut-short answer is never "complete": the caller must not skip to top.
    let r = s.read(&c, at(&epoch, 0), 2).await.unwrap();
    assert_eq!(offsets(&r.publications), [1, 2]);
    assert!(!r.complete);
    assert_eq!(r.top.offset, 5);
    // Without since: the latest ones, oldest first.
    let r = s.read(&c, None, 2).await.unwrap();
    assert_eq!(offsets(&r.publications), [4, 5]);
    assert!(!r.complete);
    let r = s.read(&c, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [1, 2, 3, 4, 5]);
    assert!(r.complete);
}

async fn read_creates_the_stream_it_reports(f: Fixture) {
    let s = &*f.store;
    let c = ch("quiet");
    // A subscriber arrives before any publication: it gets a real position...
    let r = s.read(&c, None, 10).await.unwrap();
    assert!(r.publications.is_empty());
    assert!(r.complete);
    assert_eq!(r.top.offset, 0);
    assert_eq!(s.top(&c).await.unwrap(), Some(r.top.clone()));
    // ...that stays valid when publications arrive, so it recovers them.
    let p = s.append(&c, n(1), unbounded()).await.unwrap();
    assert_eq!(p.epoch, r.top.epoch);
    assert_eq!(p.offset, 1);
    let again = s.read(&c, Some(r.top), 10).await.unwrap();
    assert!(again.complete);
    assert_eq!(offsets(&again.publications), [1]);
    // A read of an existing stream changes nothing.
    let r2 = s.read(&c, None, 10).await.unwrap();
    assert_eq!(r2.top, p);
}

async fn max_len_trims_on_append(f: Fixture) {
    let s = &*f.store;
    let c = ch("news");
    let keep3 = StreamOptions {
        max_len: Some(3),
        ttl: None,
    };
    let epoch = fill(s, &c, 10, keep3).await;
    let r = s.read(&c, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [8, 9, 10]);
    assert!(r.complete);
    assert_eq!(r.top, at(&epoch, 10).unwrap());
    // Raising the bound keeps more from now on; lowering it trims the excess at once.
    let keep5 = StreamOptions {
        max_len: Some(5),
        ttl: None,
    };
    for i in 11..=13 {
        assert_eq!(s.append(&c, n(i), keep5).await.unwrap().offset, i);
    }
    let r = s.read(&c, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [9, 10, 11, 12, 13]);
    let keep1 = StreamOptions {
        max_len: Some(1),
        ttl: None,
    };
    s.append(&c, n(14), keep1).await.unwrap();
    let r = s.read(&c, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [14]);
    assert_eq!(r.top.epoch, epoch);
}

async fn max_len_zero_keeps_nothing(f: Fixture) {
    let s = &*f.store;
    let c = ch("news");
    let none = StreamOptions {
        max_len: Some(0),
        ttl: None,
    };
    let p1 = s.append(&c, n(1), none).await.unwrap();
    let p2 = s.append(&c, n(2), none).await.unwrap();
    assert_eq!((p1.offset, p2.offset), (1, 2), "offsets still advance");
    let r = s.read(&c, None, 10).await.unwrap();
    assert!(r.publications.is_empty());
    assert_eq!(r.top, p2);
    let r = s.read(&c, Some(p1), 10).await.unwrap();
    assert!(!r.complete, "publication 2 was never kept");
}

async fn ttl_trims_by_age(f: Fixture) {
    let s = &*f.store;
    let (c, forever) = (ch("news"), ch("archive"));
    let ttl = StreamOptions {
        max_len: None,
        ttl: Some(Duration::from_secs(10)),
    };
    let t0 = start_time();
    let epoch = fill(s, &c, 2, ttl).await; // stamped t0
    fill(s, &forever, 2, unbounded()).await;
    f.clock.advance(Duration::from_secs(5));
    for i in 3..=4 {
        s.append(&c, n(i), ttl).await.unwrap(); // stamped t0 + 5s
    }

    assert_eq!(
        s.trim_expired(t0 + Duration::from_secs(9)).await.unwrap(),
        0
    );
    assert_eq!(
        s.trim_expired(t0 + Duration::from_secs(10)).await.unwrap(),
        2
    );
    let r = s.read(&c, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [3, 4]);
    let r = s.read(&c, at(&epoch, 1), 100).await.unwrap();
    assert!(!r.complete, "publication 2 expired");
    assert_eq!(offsets(&r.publications), [3, 4]);

    // Emptied by age, the stream keeps its epoch and top: offsets never repeat.
    assert_eq!(
        s.trim_expired(t0 + Duration::from_secs(60)).await.unwrap(),
        2
    );
    let r = s.read(&c, None, 100).await.unwrap();
    assert!(r.publications.is_empty());
    assert_eq!(r.top, at(&epoch, 4).unwrap());
    assert!(s.read(&c, at(&epoch, 4), 100).await.unwrap().complete);
    f.clock.set(t0 + Duration::from_secs(61));
    assert_eq!(
        s.append(&c, n(5), ttl).await.unwrap(),
        at(&epoch, 5).unwrap()
    );
    assert_eq!(
        s.trim_expired(t0 + Duration::from_secs(62)).await.unwrap(),
        0
    );

    // A stream without ttl is never trimmed by age.
    let r = s.read(&forever, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [1, 2]);
}

async fn payloads_round_trip(f: Fixture) {
    let s = &*f.store;
    let c = ch("chat:room:1");
    let texts = [
        r#"{"text":"héllo ✓","n":[1,2.5,null,true]}"#,
        r#""just a string""#,
        "  42  ",
        "null",
    ];
    for text in texts {
        s.append(&c, json(text), unbounded()).await.unwrap();
    }
    let r = s.read(&c, None, 100).await.unwrap();
    let back: Vec<&str> = r.publications.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(back, texts, "stored verbatim, byte for byte");
}

async fn concurrent_appends_get_consecutive_offsets(f: Fixture) {
    const TASKS: u64 = 400;
    let c = ch("busy");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let (store, c) = (f.store.clone(), c.clone());
        tasks.spawn(async move { (i, store.append(&c, n(i), unbounded()).await) });
    }
    let mut seen = HashSet::new();
    let mut offset_of = vec![0; TASKS as usize];
    let mut epochs = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, pos) = joined.expect("task");
        let pos = pos.expect("append");
        assert!(seen.insert(pos.offset), "offset {} given twice", pos.offset);
        offset_of[i as usize] = pos.offset;
        epochs.insert(pos.epoch);
    }
    assert_eq!(epochs.len(), 1, "one stream, one epoch");
    let mut all: Vec<u64> = seen.into_iter().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=TASKS).collect::<Vec<_>>());
    // Each publication is stored at the offset its publisher was told.
    let r = f.store.read(&c, None, TASKS as usize).await.unwrap();
    assert!(r.complete);
    for (offset, data) in &r.publications {
        let i: usize = data.as_str().parse().expect("number payload");
        assert_eq!(offset_of[i], *offset);
    }
    assert_eq!(f.store.stats().appends, TASKS);
}

// ---- What only the memory store shows ----

/// A caller that starts many appends and awaits them later (in reverse, here) still gets them
/// stored in the order it called `append`.
async fn appends_are_ordered_by_call_not_by_await(f: Fixture) {
    let channel = ch("ordered");
    let pending: Vec<_> = (1..=100u64)
        .map(|i| f.store.append(&channel, n(i), unbounded()))
        .collect();
    let mut offsets = Vec::new();
    for p in pending.into_iter().rev() {
        offsets.push(p.await.unwrap().offset);
    }
    offsets.reverse();
    assert_eq!(offsets, (1..=100).collect::<Vec<u64>>());
    let read = f.store.read(&channel, None, 1000).await.unwrap();
    let data: Vec<String> = read
        .publications
        .iter()
        .map(|(_, p)| p.as_str().to_owned())
        .collect();
    let expected: Vec<String> = (1..=100u64).map(|i| n(i).as_str().to_owned()).collect();
    assert_eq!(data, expected);
}

/// A batch appends to several streams (internal ones too) and writes keys together; with
/// `unless_exists`, a retry returns the recorded value and writes nothing.
async fn write_batches_are_atomic_and_idempotent(f: Fixture) {
    let recorder = Arc::new(Recorder::default());
    f.store.set_listener(recorder.clone());
    let inbox = |user: &str| ChannelName::internal("inbox", user);
    let batch = WriteBatch {
        appends: ["alice", "bob", "carol"]
            .into_iter()
            .map(|u| StreamAppend {
                stream: inbox(u),
                payload: json(r#"{"text":"hi"}"#),
                options: unbounded(),
            })
            .collect(),
        kv: vec![
            ("sent/alice/m1".into(), Some(b"3".to_vec())),
            ("scratch".into(), None),
        ],
        unless_exists: Some("sent/alice/m1".into()),
        offsets: vec![("where/m1".into(), vec![2, 0])],
    };
    let first = f.store.write(batch.clone()).await.unwrap();
    let WriteOutcome::Written(positions) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    assert_eq!(
        f.store.write(batch).await.unwrap(),
        WriteOutcome::Exists(b"3".to_vec())
    );
    // Nothing was appended by the retry.
    for u in ["alice", "bob", "carol"] {
        let read = f.store.read(&inbox(u), None, 10).await.unwrap();
        assert_eq!(read.publications.len(), 1, "{u}");
    }
    assert_eq!(
        recorder.0.lock().unwrap().len(),
        3,
        "listener told once per append"
    );
    assert_eq!(
        f.store.kv_get("sent/alice/m1").await.unwrap(),
        Some(b"3".to_vec())
    );
    // Offsets known only once appended were recorded with the batch.
    assert_eq!(
        f.store.kv_get("where/m1").await.unwrap(),
        Some(b"[1,1]".to_vec())
    );
    // A delete, and a bad key refuses the whole batch.
    let delete = WriteBatch {
        kv: vec![("sent/alice/m1".into(), None)],
        ..Default::default()
    };
    f.store.write(delete).await.unwrap();
    assert_eq!(f.store.kv_get("sent/alice/m1").await.unwrap(), None);
    let bad = WriteBatch {
        appends: vec![StreamAppend {
            stream: inbox("dave"),
            payload: n(1),
            options: unbounded(),
        }],
        kv: vec![(String::new(), Some(vec![]))],
        unless_exists: None,
        offsets: Vec::new(),
    };
    assert!(matches!(
        f.store.write(bad).await,
        Err(StoreError::Invalid(_))
    ));
    let out_of_range = WriteBatch {
        appends: vec![StreamAppend {
            stream: inbox("dave"),
            payload: n(1),
            options: unbounded(),
        }],
        offsets: vec![("k".into(), vec![1])],
        ..Default::default()
    };
    assert!(matches!(
        f.store.write(out_of_range).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(f.store.top(&inbox("dave")).await.unwrap(), None);
}

async fn key_value_get_and_scan(f: Fixture) {
    let put = |k: &str, v: &str| (k.to_owned(), Some(v.as_bytes().to_vec()));
    let batch = WriteBatch {
        kv: vec![
            put("group/b/x", "1"),
            put("group/a/y", "2"),
            put("group/a/x", "3"),
            put("groups", "4"),
            put("user/x/a", "5"),
        ],
        ..Default::default()
    };
    assert_eq!(
        f.store.write(batch).await.unwrap(),
        WriteOutcome::Written(vec![])
    );
    let keys = |v: Vec<(String, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(f.store.kv_scan("group/a/", 10).await.unwrap()),
        ["group/a/x", "group/a/y"]
    );
    assert_eq!(
        keys(f.store.kv_scan("group/", 2).await.unwrap()),
        ["group/a/x", "group/a/y"]
    );
    assert_eq!(
        keys(f.store.kv_scan("nothing", 10).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(f.store.kv_get("groups").await.unwrap(), Some(b"4".to_vec()));
}

/// Records what the listener is told.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, u64, String)>>);

impl AppendListener for Recorder {
    fn appended(&self, channel: &str, position: &Position, payload: &Payload) {
        self.0.lock().unwrap().push((
            channel.to_owned(),
            position.offset,
            payload.as_str().to_owned(),
        ));
    }
}

/// However the appenders' tasks are scheduled, the listener sees each channel's offsets in order,
/// each exactly once, and each before its appender's future resolves.
async fn listener_sees_every_append_in_offset_order(f: Fixture) {
    let recorder = Arc::new(Recorder::default());
    assert!(f.store.set_listener(recorder.clone()));
    assert!(!f.store.set_listener(Arc::new(Recorder::default())));
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let (store, recorder) = (f.store.clone(), recorder.clone());
        tasks.push(tokio::spawn(async move {
            let channel = ch(if i % 2 == 0 { "even" } else { "odd" });
            let position = store.append(&channel, n(i), unbounded()).await.unwrap();
            // Already announced when the append resolves.
            let seen = recorder
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|(c, o, _)| c.as_str() == channel.as_str() && *o == position.offset);
            assert!(
                seen,
                "offset {} not announced before the ack",
                position.offset
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = recorder.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 300);
    for name in ["even", "odd"] {
        let offsets: Vec<u64> = seen
            .iter()
            .filter(|(c, ..)| c == name)
            .map(|(_, o, _)| *o)
            .collect();
        assert_eq!(offsets, (1..=150).collect::<Vec<u64>>(), "{name}");
    }
}

#[tokio::test]
async fn memory_store_restart_means_new_epochs() {
    let c = ch("news");
    let before = MemoryStore::new();
    let old = fill(&before, &c, 3, unbounded()).await;
    drop(before);
    let after = MemoryStore::new();
    let r = after.read(&c, at(&old, 3), 100).await.unwrap();
    assert!(!r.complete, "history was lost with the process");
    assert_ne!(r.top.epoch, old);
    assert_eq!(r.top.offset, 0);
}

// ---- What only the durable store shows ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_restart_keeps_key_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).await.unwrap();
    let batch = WriteBatch {
        kv: vec![("member/g/alice".into(), Some(b"1".to_vec()))],
        ..Default::default()
    };
    store.write(batch).await.unwrap();
    store.close().await.unwrap();
    let store = RedbStore::open(dir.path()).await.unwrap();
    assert_eq!(
        store.kv_get("member/g/alice").await.unwrap(),
        Some(b"1".to_vec())
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_restart_keeps_epoch_offsets_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let (c, trimmed) = (ch("news"), ch("short"));
    let keep2 = StreamOptions {
        max_len: Some(2),
        ttl: Some(Duration::from_secs(3600)),
    };
    let store = RedbStore::open(dir.path()).await.unwrap();
    let epoch = fill(&store, &c, 3, unbounded()).await;
    let short_epoch = fill(&store, &trimmed, 5, keep2).await;
    store.close().await.unwrap();

    let store = RedbStore::open(dir.path()).await.unwrap();
    assert_eq!(store.top(&c).await.unwrap(), at(&epoch, 3));
    assert_eq!(
        store.append(&c, n(4), unbounded()).await.unwrap(),
        at(&epoch, 4).unwrap()
    );
    let r = store.read(&c, at(&epoch, 1), 100).await.unwrap();
    assert!(r.complete);
    assert_eq!(offsets(&r.publications), [2, 3, 4]);
    // Trimming state and stream options survive too.
    let r = store.read(&trimmed, None, 100).await.unwrap();
    assert_eq!(offsets(&r.publications), [4, 5]);
    assert_eq!(r.top, at(&short_epoch, 5).unwrap());
    let later = SystemTime::now() + Duration::from_secs(7200);
    assert_eq!(
        store.trim_expired(later).await.unwrap(),
        2,
        "ttl was stored"
    );
    store.close().await.unwrap();

    // A data directory that does not exist yet is created.
    let nested = dir.path().join("a/b");
    let store = RedbStore::open(&nested).await.unwrap();
    assert_eq!(store.top(&c).await.unwrap(), None);
    store.close().await.unwrap();
}

/// Concurrent appends share commits. On a current-thread runtime every task queues its append
/// before the writer runs, so the batching is certain, not a matter of timing.
#[tokio::test]
async fn redb_group_commit_batches_concurrent_appends() {
    const TASKS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path()).await.unwrap());
    let c = ch("busy");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let (store, c) = (store.clone(), c.clone());
        tasks.spawn(async move { store.append(&c, n(i), unbounded()).await });
    }
    let mut offsets = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        offsets.push(joined.unwrap().unwrap().offset);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=TASKS).collect::<Vec<_>>());
    let stats = store.stats();
    assert_eq!(stats.appends, TASKS);
    assert!(
        stats.commits < stats.appends / 10,
        "{} commits for {} appends",
        stats.commits,
        stats.appends
    );
    // Reads commit nothing; neither does an expiry pass that finds nothing to drop.
    store.read(&c, None, 10).await.unwrap();
    store.trim_expired(SystemTime::now()).await.unwrap();
    assert_eq!(store.stats().commits, stats.commits);
}

/// The same on a multi-threaded runtime, where publishers and the writer really run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_group_commit_under_parallel_load() {
    const TASKS: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path()).await.unwrap());
    let channels: Vec<ChannelName> = (0..4).map(|i| ch(&format!("c{i}"))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let (store, c) = (store.clone(), channels[(i % 4) as usize].clone());
        tasks.spawn(async move { (c.clone(), store.append(&c, n(i), unbounded()).await) });
    }
    let mut per_channel: std::collections::HashMap<String, Vec<u64>> = Default::default();
    while let Some(joined) = tasks.join_next().await {
        let (c, pos) = joined.unwrap();
        per_channel
            .entry(c.to_string())
            .or_default()
            .push(pos.unwrap().offset);
    }
    for (_, mut offsets) in per_channel {
        offsets.sort_unstable();
        assert_eq!(offsets, (1..=TASKS / 4).collect::<Vec<_>>());
    }
    let stats = store.stats();
    assert_eq!(stats.appends, TASKS);
    assert!(stats.commits < stats.appends, "{stats:?}");
    eprintln!("parallel load: {stats:?}");
}

#[tokio::test]
async fn redb_second_open_of_the_same_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).await.unwrap();
    let second = RedbStore::open(dir.path()).await;
    assert!(
        matches!(second, Err(StoreError::Backend(_))),
        "{:?}",
        second.err()
    );
    store.close().await.unwrap();
    // Closed: the file is free again.
    RedbStore::open(dir.path())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

#[test]
fn redb_open_outside_a_runtime_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let opened = futures_lite_block_on(RedbStore::open(dir.path()));
    assert!(matches!(opened, Err(StoreError::Runtime(_))));
}

/// A minimal executor, so the test above polls outside any Tokio runtime.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
}
