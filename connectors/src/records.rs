//! What travels through a records topic besides the record itself, and how the write
//! lane decides what of it to write.
//!
//! Every record is produced with headers naming the claim that produced it
//! (incarnation, owner epoch), the spec version it was read under, the lane that read
//! it (backfill, sync or live) and its position in the source (for the generator: the
//! record id; for a table: its key, or its cursor column and key). Backfill slices are produced in Kafka
//! transactions, so a slice is in the topic whole or not at all, and a new owner's
//! producer fences its predecessor's. Two things can still put a record in the topic
//! that must not be written, and [`select`] drops both:
//!
//! - a record of an older spec (in flight when the spec changed);
//! - a replay: a slice produced again because its owner crashed (or was fenced) after
//!   Kafka committed it but before the cursor was saved. Its positions are not past
//!   the last written position of its stream and lane, which the destination keeps with
//!   its offsets.

use std::collections::BTreeMap;

use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde_json::{Map, Value};

use crate::position::Position;

pub const INCARNATION_HEADER: &str = "sluice-incarnation";
pub const EPOCH_HEADER: &str = "sluice-epoch";
pub const SPEC_VERSION_HEADER: &str = "sluice-spec-version";
pub const POSITION_HEADER: &str = "sluice-position";
pub const LANE_HEADER: &str = "sluice-lane";
pub const RUN_HEADER: &str = "sluice-run";
/// Every tag in one header (one header costs the producer and the consumer far less
/// than six): `v1;<incarnation>;<epoch>;<spec version>;<lane>;<run or ->;<position>`,
/// the position last, as JSON (it may hold `;`). Records produced before it carry one
/// header per tag, which are still read.
pub const TAGS_HEADER: &str = "sluice-tags";

/// Which lane read a record: positions only compare within one stream and lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Backfill,
    Sync,
    Live,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backfill => "backfill",
            Self::Sync => "sync",
            Self::Live => "live",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Backfill, Self::Sync, Self::Live]
            .into_iter()
            .find(|l| l.as_str() == s)
    }
}

/// Who produced a record, under which spec, from where in the source.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordTags {
    pub incarnation: i64,
    pub epoch: i64,
    pub spec_version: i64,
    pub lane: Lane,
    /// Position in the source, increasing in produce order within a stream, lane and
    /// spec version.
    pub position: Option<Position>,
    /// The run (backfill or sync) that read it, if any.
    pub run: Option<i64>,
}

impl RecordTags {
    pub fn to_headers(&self) -> OwnedHeaders {
        let run = self.run.map_or_else(|| "-".to_owned(), |r| r.to_string());
        let position = self
            .position
            .as_ref()
            .map_or_else(String::new, Position::to_header);
        let value = format!(
            "v1;{};{};{};{};{run};{position}",
            self.incarnation,
            self.epoch,
            self.spec_version,
            self.lane.as_str()
        );
        OwnedHeaders::new_with_capacity(1).insert(Header {
            key: TAGS_HEADER,
            value: Some(value.as_bytes()),
        })
    }

    fn from_compact(value: Option<&[u8]>) -> Result<Self, String> {
        let text = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or_else(|| format!("header {TAGS_HEADER} is not text"))?;
        let bad = || format!("header {TAGS_HEADER} is malformed: {text:?}");
        let mut parts = text.splitn(7, ';');
        if parts.next() != Some("v1") {
            return Err(bad());
        }
        let mut number =
            || -> Result<i64, String> { parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad) };
        let (incarnation, epoch, spec_version) = (number()?, number()?, number()?);
        let lane = parts.next().and_then(Lane::parse).ok_or_else(bad)?;
        let run = match parts.next().ok_or_else(bad)? {
            "-" => None,
            r => Some(r.parse::<i64>().map_err(|_| bad())?),
        };
        let position = match parts.next().ok_or_else(bad)? {
            "" => None,
            p => Some(Position::from_header(p)?),
        };
        Ok(Self {
            incarnation,
            epoch,
            spec_version,
            lane,
            position,
            run,
        })
    }

    /// One header per tag, as records were produced before [`TAGS_HEADER`].
    pub fn to_legacy_headers(&self) -> OwnedHeaders {
        let numbers = [
            (INCARNATION_HEADER, self.incarnation),
            (EPOCH_HEADER, self.epoch),
            (SPEC_VERSION_HEADER, self.spec_version),
        ];
        let mut headers = OwnedHeaders::new_with_capacity(5);
        for (key, value) in numbers {
            headers = headers.insert(Header {
                key,
                value: Some(value.to_string().as_bytes()),
            });
        }
        headers = headers.insert(Header {
            key: LANE_HEADER,
            value: Some(self.lane.as_str().as_bytes()),
        });
        if let Some(run) = self.run {
            headers = headers.insert(Header {
                key: RUN_HEADER,
                value: Some(run.to_string().as_bytes()),
            });
        }
        if let Some(position) = &self.position {
            headers = headers.insert(Header {
                key: POSITION_HEADER,
                value: Some(position.to_header().as_bytes()),
            });
        }
        headers
    }

    /// Reads the tags of a consumed record; None if it carries no Sluice headers at all
    /// (produced before records were tagged), an error if they are malformed.
    pub fn from_headers<H: Headers>(headers: Option<&H>) -> Result<Option<Self>, String> {
        let Some(headers) = headers else {
            return Ok(None);
        };
        if let Some(tags) = headers.iter().find(|h| h.key == TAGS_HEADER) {
            return Self::from_compact(tags.value).map(Some);
        }
        let mut numbers = [None; 3];
        let mut lane = None;
        let mut position = None;
        let mut run = None;
        for header in headers.iter() {
            let text = || {
                header
                    .value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .ok_or_else(|| format!("header {} is not text", header.key))
            };
            let slot = match header.key {
                INCARNATION_HEADER => 0,
                EPOCH_HEADER => 1,
                SPEC_VERSION_HEADER => 2,
                LANE_HEADER => {
                    let t = text()?;
                    lane = Some(Lane::parse(t).ok_or_else(|| format!("unknown lane {t:?}"))?);
                    continue;
                }
                POSITION_HEADER => {
                    position = Some(Position::from_header(text()?)?);
                    continue;
                }
                RUN_HEADER => {
                    run = Some(
                        text()?
                            .parse::<i64>()
                            .map_err(|_| "header sluice-run is not a number".to_owned())?,
                    );
                    continue;
                }
                _ => continue,
            };
            let value = text()?
                .parse::<i64>()
                .map_err(|_| format!("header {} is not a number", header.key))?;
            numbers[slot] = Some(value);
        }
        match (numbers, lane) {
            ([None, None, None], None) if position.is_none() => Ok(None),
            ([Some(incarnation), Some(epoch), Some(spec_version)], lane) => Ok(Some(Self {
                incarnation,
                epoch,
                spec_version,
                lane: lane.unwrap_or(Lane::Backfill),
                position,
                run,
            })),
            _ => Err("incomplete Sluice headers".into()),
        }
    }
}

/// A record read from the records topic, ready to be written.
#[derive(Debug, Clone)]
pub struct PendingRecord {
    pub offset: i64,
    pub stream: String,
    pub tags: Option<RecordTags>,
    pub data: Map<String, Value>,
}

impl PendingRecord {
    /// The scope its position compares within: stream and lane.
    fn position_scope(&self, lane: Lane) -> String {
        format!("{}/{}", self.stream, lane.as_str())
    }
}

/// What the destination has committed for a write lane, stored with its offsets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteState {
    /// Next records-topic offset to consume.
    pub next_offset: i64,
    /// Spec version of the last written record.
    pub spec_version: i64,
    /// Source position of the last written record of each stream and lane, for that
    /// spec version ("orders/backfill" → [42]).
    pub positions: BTreeMap<String, Position>,
}

/// Why a batch cannot be written at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The topic holds a record of a newer spec than this lane's: another owner has
    /// set up a newer spec, so this lane is stale.
    Superseded { offset: i64, spec_version: i64 },
    /// The topic holds a record of another incarnation: it is not the topic this
    /// incarnation set up.
    ForeignIncarnation { offset: i64, incarnation: i64 },
    /// The batch starts below the committed offset: offsets would move back.
    OffsetsBack { first: i64, committed: i64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Superseded { offset, spec_version } => write!(
                f,
                "record at offset {offset} belongs to spec version {spec_version}, newer than this lane's"
            ),
            Self::ForeignIncarnation { offset, incarnation } => write!(
                f,
                "record at offset {offset} was produced by incarnation {incarnation}: the records topic is not the one this pipeline set up"
            ),
            Self::OffsetsBack { first, committed } => write!(
                f,
                "batch starting at offset {first} would move the committed offset back from {committed}"
            ),
        }
    }
}

/// Picks the records of `batch` (in offset order) to write for a lane of `incarnation`
/// under `spec_version`, given what the destination has committed; returns their
/// indices and the state to commit with them. Records not picked are still consumed:
/// the returned state's offset is past the whole batch.
pub fn select(
    committed: WriteState,
    incarnation: i64,
    spec_version: i64,
    batch: &[PendingRecord],
) -> Result<(Vec<usize>, WriteState), Refusal> {
    if committed.spec_version > spec_version {
        // The destination already holds a newer spec's records: this lane is stale.
        return Err(Refusal::Superseded {
            offset: committed.next_offset,
            spec_version: committed.spec_version,
        });
    }
    let Some(first) = batch.first() else {
        return Ok((Vec::new(), committed));
    };
    if first.offset < committed.next_offset {
        return Err(Refusal::OffsetsBack {
            first: first.offset,
            committed: committed.next_offset,
        });
    }
    let mut state = committed;
    if state.spec_version != spec_version {
        // The first batch of a newer spec: its positions start afresh.
        state.spec_version = spec_version;
        state.positions.clear();
    }
    let mut picked = Vec::with_capacity(batch.len());
    for (i, record) in batch.iter().enumerate() {
        state.next_offset = record.offset + 1;
        // Records from before tagging belong to the spec the lane started with.
        let Some(tags) = &record.tags else {
            picked.push(i);
            continue;
        };
        if tags.incarnation != incarnation {
            return Err(Refusal::ForeignIncarnation {
                offset: record.offset,
                incarnation: tags.incarnation,
            });
        }
        if tags.spec_version > spec_version {
            return Err(Refusal::Superseded {
                offset: record.offset,
                spec_version: tags.spec_version,
            });
        }
        if tags.spec_version < spec_version {
            continue;
        }
        match &tags.position {
            Some(p) => {
                let scope = record.position_scope(tags.lane);
                if state.positions.get(&scope).is_some_and(|last| p <= last) {
                    continue;
                }
                state.positions.insert(scope, p.clone());
                picked.push(i);
            }
            None => picked.push(i),
        }
    }
    Ok((picked, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(
        offset: i64,
        stream: &str,
        lane: Lane,
        spec_version: i64,
        position: i64,
    ) -> PendingRecord {
        PendingRecord {
            offset,
            stream: stream.into(),
            tags: Some(RecordTags {
                incarnation: 7,
                epoch: 1,
                spec_version,
                lane,
                position: Some(Position::int(position)),
                run: None,
            }),
            data: Map::new(),
        }
    }

    fn record(offset: i64, spec_version: i64, position: i64) -> PendingRecord {
        tagged(offset, "records", Lane::Backfill, spec_version, position)
    }

    fn state(next_offset: i64, spec_version: i64, last: Option<i64>) -> WriteState {
        WriteState {
            next_offset,
            spec_version,
            positions: last
                .map(|p| ("records/backfill".to_owned(), Position::int(p)))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn a_replayed_slice_is_dropped_and_its_offsets_consumed() {
        // Slice 0..3 written, then produced again (crash before the cursor was saved),
        // then the next slice.
        let batch: Vec<_> = [
            (10, 0),
            (11, 1),
            (12, 2),
            (13, 0),
            (14, 1),
            (15, 2),
            (16, 3),
        ]
        .into_iter()
        .map(|(o, p)| record(o, 1, p))
        .collect();
        let (picked, next) = select(state(10, 1, None), 7, 1, &batch).expect("writable");
        assert_eq!(picked, [0, 1, 2, 6]);
        assert_eq!(next, state(17, 1, Some(3)));
        // The same replay split over two batches.
        let (picked, mid) = select(state(10, 1, None), 7, 1, &batch[..4]).expect("writable");
        assert_eq!(picked, [0, 1, 2]);
        let (picked, _) = select(mid, 7, 1, &batch[4..]).expect("writable");
        assert_eq!(picked, [2], "only position 3 is new");
    }

    #[test]
    fn positions_compare_within_their_stream_and_lane_only() {
        let batch = [
            tagged(0, "orders", Lane::Backfill, 1, 5),
            tagged(1, "customers", Lane::Backfill, 1, 1),
            tagged(2, "orders", Lane::Sync, 1, 1),
            tagged(3, "orders", Lane::Backfill, 1, 5),
            tagged(4, "orders", Lane::Live, 1, 0),
        ];
        let (picked, next) = select(WriteState::default(), 7, 1, &batch).expect("writable");
        assert_eq!(
            picked,
            [0, 1, 2, 4],
            "only the repeated orders/backfill 5 is a replay"
        );
        assert_eq!(next.positions.len(), 4);
    }

    #[test]
    fn records_of_an_older_spec_are_dropped_and_a_newer_spec_stops_the_lane() {
        let batch = [
            record(5, 1, 900),
            record(6, 2, 0),
            record(7, 1, 901),
            record(8, 2, 1),
        ];
        let (picked, next) = select(state(5, 1, Some(899)), 7, 2, &batch).expect("writable");
        assert_eq!(picked, [1, 3], "old-spec records never land");
        assert_eq!(
            next,
            state(9, 2, Some(1)),
            "positions restart with the new spec"
        );
        assert_eq!(
            select(state(5, 1, Some(899)), 7, 1, &batch),
            Err(Refusal::Superseded {
                offset: 6,
                spec_version: 2
            })
        );
    }

    #[test]
    fn another_incarnations_record_refuses_the_topic() {
        let mut stranger = record(3, 1, 0);
        if let Some(tags) = stranger.tags.as_mut() {
            tags.incarnation = 6;
        }
        assert!(matches!(
            select(state(3, 1, None), 7, 1, &[stranger]),
            Err(Refusal::ForeignIncarnation {
                offset: 3,
                incarnation: 6
            })
        ));
    }

    #[test]
    fn offsets_never_move_back_and_empty_batches_change_nothing() {
        assert!(matches!(
            select(state(10, 1, None), 7, 1, &[record(9, 1, 0)]),
            Err(Refusal::OffsetsBack { .. })
        ));
        assert_eq!(
            select(state(10, 1, Some(4)), 7, 1, &[]),
            Ok((Vec::new(), state(10, 1, Some(4))))
        );
    }

    #[test]
    fn untagged_records_are_written_as_they_come() {
        let plain = PendingRecord {
            offset: 0,
            stream: "records".into(),
            tags: None,
            data: Map::new(),
        };
        assert_eq!(
            select(state(0, 0, None), 7, 0, &[plain]),
            Ok((vec![0], state(1, 0, None)))
        );
    }

    #[test]
    fn tags_round_trip_through_headers() {
        let tags = RecordTags {
            incarnation: 12,
            epoch: 345,
            spec_version: 2,
            lane: Lane::Sync,
            position: Some(Position::of([Value::from("2026-11-30"), Value::from(99)])),
            run: Some(3),
        };
        let headers = tags.to_headers();
        assert_eq!(
            RecordTags::from_headers(Some(&headers)),
            Ok(Some(tags.clone()))
        );
        let no_position = RecordTags {
            position: None,
            ..tags
        };
        assert_eq!(
            RecordTags::from_headers(Some(&no_position.to_headers())),
            Ok(Some(no_position))
        );
        assert_eq!(RecordTags::from_headers::<OwnedHeaders>(None), Ok(None));
        let broken = OwnedHeaders::new().insert(Header {
            key: EPOCH_HEADER,
            value: Some("x".as_bytes()),
        });
        assert!(RecordTags::from_headers(Some(&broken)).is_err());
    }

    #[test]
    fn compact_tags_hold_any_position_and_legacy_headers_still_read() {
        let tags = RecordTags {
            incarnation: 1,
            epoch: 2,
            spec_version: 3,
            lane: Lane::Live,
            position: Some(Position::of([
                Value::from("a;b;c"),
                Value::Null,
                Value::from(-5),
            ])),
            run: None,
        };
        assert_eq!(
            RecordTags::from_headers(Some(&tags.to_headers())),
            Ok(Some(tags.clone()))
        );
        assert_eq!(tags.to_headers().count(), 1);
        assert_eq!(
            RecordTags::from_headers(Some(&tags.to_legacy_headers())),
            Ok(Some(tags))
        );
        for bad in [
            "v2;1;2;3;live;-;",
            "v1;1;2;x;live;-;",
            "v1;1;2;3;fast;-;",
            "v1;1;2;3",
        ] {
            let headers = OwnedHeaders::new().insert(Header {
                key: TAGS_HEADER,
                value: Some(bad.as_bytes()),
            });
            assert!(RecordTags::from_headers(Some(&headers)).is_err(), "{bad}");
        }
    }
}
