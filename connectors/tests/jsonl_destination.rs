//! The jsonl destination on a real file system: a batch cut short by a crash is cut
//! from the file when the write lane is taken over, replays are dropped, and a stale
//! owner's write is refused.

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sluice_connectors::records::{Lane, PendingRecord, RecordTags};
use sluice_connectors::registry::DestinationKind;
use sluice_connectors::{ActivityError, Claim, Context, Destination, Position, WriteTarget};
use sluice_protocol::catalog::generator_stream;
use sluice_protocol::message::FailureType;

fn context(dir: &std::path::Path) -> Context {
    Context {
        worker_id: "test".into(),
        ca_dir: None,
        files_dir: Some(dir.to_path_buf()),
        hosts: Default::default(),
        statement_timeout: Duration::from_secs(5),
        idle_in_transaction_timeout: Duration::from_secs(5),
        pg_pools: Default::default(),
    }
}

fn destination() -> Box<dyn Destination> {
    let Value::Object(config) = json!({"directory": "out", "batch_size": 10}) else {
        unreachable!("an object literal")
    };
    sluice_connectors::jsonl::JsonlDestinationKind
        .build(&config, "d")
        .expect("a valid config")
}

fn record(offset: i64, id: i64, claim: &Claim) -> PendingRecord {
    let mut data = Map::new();
    data.insert("id".into(), json!(id));
    PendingRecord {
        offset,
        stream: "records".into(),
        tags: Some(RecordTags {
            incarnation: claim.incarnation,
            epoch: claim.epoch,
            spec_version: 1,
            lane: Lane::Backfill,
            position: Some(Position::int(id)),
            run: None,
        }),
        data,
    }
}

fn ids(path: &std::path::Path) -> Vec<i64> {
    std::fs::read_to_string(path)
        .expect("the file")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["id"]
                .as_i64()
                .expect("id")
        })
        .collect()
}

#[tokio::test]
async fn takeover_cuts_an_uncommitted_tail_drops_replays_and_fences_the_old_owner() {
    let dir = std::env::temp_dir().join(format!("sluice-jsonl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let ctx = context(&dir);
    let d = destination();
    let streams = vec![generator_stream()];
    let first = Claim {
        key: "t.p".into(),
        incarnation: 1,
        epoch: 10,
    };
    d.setup(&ctx, &streams, &first).await.expect("setup");
    let target = |claim: &'static Claim| WriteTarget {
        claim,
        topic: "records",
        partition: 0,
        spec_version: 1,
    };
    let first: &'static Claim = Box::leak(Box::new(first));
    let state = d.fence(&ctx, &target(first), 0).await.expect("fence");
    assert_eq!(state.next_offset, 0);
    let batch: Vec<_> = (0..5).map(|i| record(i, i, first)).collect();
    let written = d
        .write(&ctx, &target(first), &streams, &batch)
        .await
        .expect("write");
    assert_eq!(written.next_offset, 5);
    let file = dir.join("out/records.jsonl");
    assert_eq!(ids(&file), vec![0, 1, 2, 3, 4]);

    // A crash after appending lines, before the state was saved.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .expect("open")
        .write_all(b"{\"id\": 5}\n{\"id\": 6")
        .expect("append");

    let second: &'static Claim = Box::leak(Box::new(Claim {
        epoch: 11,
        ..first.clone()
    }));
    let state = d.fence(&ctx, &target(second), 0).await.expect("takeover");
    assert_eq!(state.next_offset, 5);
    assert_eq!(
        ids(&file),
        vec![0, 1, 2, 3, 4],
        "the uncommitted tail stays"
    );

    // The old owner is refused; the new one writes, a replay of ids 3..=4 dropped.
    let refused = d
        .write(&ctx, &target(first), &streams, &[record(5, 5, first)])
        .await;
    assert!(matches!(refused, Err(ActivityError::Fenced)), "{refused:?}");
    let batch: Vec<_> = [(5, 3), (6, 4), (7, 5), (8, 6)]
        .into_iter()
        .map(|(offset, id)| record(offset, id, second))
        .collect();
    let written = d
        .write(&ctx, &target(second), &streams, &batch)
        .await
        .expect("write");
    assert_eq!(written.records, vec![2, 3]);
    assert_eq!(written.next_offset, 9);
    assert_eq!(ids(&file), vec![0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(
        d.committed(&ctx, &target(second)).await.expect("committed"),
        Some(9)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_file_it_never_wrote_is_refused_and_a_new_incarnation_appends() {
    let dir = std::env::temp_dir().join(format!("sluice-jsonl-own-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).expect("a temp dir");
    let ctx = context(&dir);
    let d = destination();
    let streams = vec![generator_stream()];
    let target = |claim: &'static Claim| WriteTarget {
        claim,
        topic: "records",
        partition: 0,
        spec_version: 1,
    };

    // Someone else's file where this pipeline would write: refused, left as it was.
    let file = dir.join("out/records.jsonl");
    std::fs::write(&file, b"{\"id\": 100}\n").expect("a foreign file");
    let first: &'static Claim = Box::leak(Box::new(Claim {
        key: "t.p".into(),
        incarnation: 1,
        epoch: 1,
    }));
    d.setup(&ctx, &streams, first).await.expect("setup");
    d.fence(&ctx, &target(first), 0).await.expect("fence");
    let refused = d
        .write(&ctx, &target(first), &streams, &[record(0, 0, first)])
        .await;
    match &refused {
        Err(ActivityError::Failed {
            failure_type,
            message,
        }) => {
            assert_eq!(*failure_type, FailureType::ConfigError, "{message}");
            assert!(
                message.contains("was not written by this pipeline"),
                "{message}"
            );
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    assert_eq!(ids(&file), vec![100], "the foreign file is untouched");

    // Once it is gone, this incarnation writes; the next one appends to its files.
    std::fs::remove_file(&file).expect("remove");
    let batch: Vec<_> = (0..3).map(|i| record(i, i, first)).collect();
    d.write(&ctx, &target(first), &streams, &batch)
        .await
        .expect("write");
    let second: &'static Claim = Box::leak(Box::new(Claim {
        key: "t.p".into(),
        incarnation: 2,
        epoch: 1,
    }));
    d.setup(&ctx, &streams, second).await.expect("setup");
    let state = d.fence(&ctx, &target(second), 0).await.expect("fence");
    assert_eq!(
        state.next_offset, 0,
        "a new incarnation reads its topic anew"
    );
    let batch: Vec<_> = (0..2).map(|i| record(i, 10 + i, second)).collect();
    d.write(&ctx, &target(second), &streams, &batch)
        .await
        .expect("write");
    assert_eq!(ids(&file), vec![0, 1, 2, 10, 11]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_batch_that_fails_part_way_leaves_no_file_looking_foreign() {
    let dir = std::env::temp_dir().join(format!("sluice-jsonl-claim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).expect("a temp dir");
    let ctx = context(&dir);
    let d = destination();
    let mut other = generator_stream();
    other.name = "zzz".into();
    let streams = vec![generator_stream(), other];
    let claim: &'static Claim = Box::leak(Box::new(Claim {
        key: "t.p".into(),
        incarnation: 1,
        epoch: 1,
    }));
    let target = WriteTarget {
        claim,
        topic: "records",
        partition: 0,
        spec_version: 1,
    };
    d.setup(&ctx, &streams, claim).await.expect("setup");
    d.fence(&ctx, &target, 0).await.expect("fence");
    // One batch for two files; the second one's path is taken by something else.
    let mut batch: Vec<_> = (0..3).map(|i| record(i, i, claim)).collect();
    let mut last = record(3, 3, claim);
    last.stream = "zzz".into();
    batch.push(last);
    let blocker = dir.join("out/zzz.jsonl");
    std::fs::create_dir_all(blocker.join("x")).expect("a directory in the way");
    let refused = d.write(&ctx, &target, &streams, &batch).await;
    assert!(refused.is_err(), "{refused:?}");

    // Once the way is clear the same batch goes in, each line once: the first file
    // was not left half written and unclaimed (which would now look foreign).
    std::fs::remove_dir_all(&blocker).expect("clear the way");
    d.write(&ctx, &target, &streams, &batch)
        .await
        .expect("the retry writes");
    assert_eq!(ids(&dir.join("out/records.jsonl")), vec![0, 1, 2]);
    assert_eq!(ids(&blocker), vec![3]);
    let _ = std::fs::remove_dir_all(&dir);
}
