//! Property-based fuzzing of everything a client controls before it reaches the store:
//! protobuf Struct conversion, spec validation through the connectors' registry and the
//! update-mask path. Whatever the
//! input, these must return a value or a field violation — never panic — and anything
//! they accept must validate again after a storage round trip.

use proptest::prelude::*;
use prost_types::value::Kind;
use serde_json::{Map, Value};
use sluice_connectors::registry;
use sluice_protocol::conversions::{json_to_struct, struct_to_json};
use sluice_protocol::mask::{apply_patch, parse_mask, PipelinePatch};
use sluice_protocol::spec::{ConnectorSpec, PipelineSpec};
use sluice_protocol::status::DesiredStatus;

const KEYS: &[&str] = &[
    "count",
    "seed",
    "slice_size",
    "records_per_second",
    "url",
    "schema",
    "table",
    "drop_table_on_delete",
    "batch_size",
    "extra",
    "",
    "Count",
];
const TYPES: &[&str] = &[
    "generator",
    "postgres",
    "",
    "kafka",
    "GENERATOR",
    "postgres ",
];
const PATHS: &[&str] = &[
    "desired_status",
    "spec",
    "spec.source",
    "spec.destination",
    "*",
    "status",
    "etag",
    "spec.source.config",
    "spec.streams",
    "spec.schedule",
    "spec.retry",
    "",
    "id",
    "generation",
];

fn proto_value() -> impl Strategy<Value = prost_types::Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<f64>().prop_map(Kind::NumberValue),
        prop_oneof![
            Just(0.0),
            Just(-1.0),
            Just(1e300),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(10000.0),
            Just(0.5)
        ]
        .prop_map(Kind::NumberValue),
        ".{0,12}".prop_map(Kind::StringValue),
        Just(Kind::StringValue("postgres://u:p@127.0.0.1:1/db".into())),
        Just(Kind::StringValue("orders".into())),
        any::<bool>().prop_map(Kind::BoolValue),
    ]
    .prop_map(|k| prost_types::Value { kind: Some(k) });
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|values| prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue { values }))
            }),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..4).prop_map(|m| {
                prost_types::Value {
                    kind: Some(Kind::StructValue(prost_types::Struct {
                        fields: m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    })),
                }
            }),
        ]
    })
}

fn config() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(prop::sample::select(KEYS), proto_value(), 0..6).prop_map(|m| {
        let s = prost_types::Struct {
            fields: m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        struct_to_json(&s)
    })
}

fn connector() -> impl Strategy<Value = ConnectorSpec> {
    (prop::sample::select(TYPES), config()).prop_map(|(t, config)| ConnectorSpec {
        connector_type: t.to_string(),
        config,
    })
}

fn desired() -> impl Strategy<Value = Option<DesiredStatus>> {
    prop::option::of(prop::sample::select(DesiredStatus::ALL.to_vec()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn validation_never_panics_and_accepted_specs_survive_storage(source in connector(), destination in connector()) {
        let spec = PipelineSpec::new(source, destination);
        if registry().validate(&spec, "pipeline.spec").is_ok() {
            let stored = PipelineSpec::from_json(spec.to_json()).expect("a valid spec round-trips through JSON");
            prop_assert!(registry().validate(&stored, "pipeline.spec").is_ok());
            // And through the wire format.
            let wire = struct_to_json(&json_to_struct(&spec.source.config));
            prop_assert_eq!(wire, spec.source.config.clone());
        }
    }

    #[test]
    fn update_mask_path_never_panics(
        paths in prop::collection::vec(prop::sample::select(PATHS), 0..4),
        desired in desired(),
        source in prop::option::of(connector()),
        destination in prop::option::of(connector()),
        current_source in connector(),
        current_destination in connector(),
    ) {
        let patch = PipelinePatch { desired_status: desired, source, destination, ..Default::default() };
        let paths: Vec<String> = paths.into_iter().map(str::to_owned).collect();
        let current = PipelineSpec::new(current_source, current_destination);
        if let Ok(mask) = parse_mask(&paths, &patch) {
            if let Ok((d, spec)) = apply_patch(DesiredStatus::Active, &current, &patch, &mask) {
                prop_assert_ne!(d, DesiredStatus::Deleted);
                let _ = registry().validate(&spec, "pipeline.spec");
            }
        }
    }
}
