//! openapi.yaml is the published contract: it must describe exactly the routes the server has.
use std::collections::BTreeSet;

use serde_yaml::Value;
use sqlx::PgPool;
use vidtune::http::ErrorCode;

use crate::helpers::spawn_app;

fn document() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml at the crate root");
    serde_yaml::from_str(&text).expect("openapi.yaml parses")
}

/// (METHOD, path, operationId) of every operation in the document.
fn documented() -> BTreeSet<(String, String, String)> {
    let doc = document();
    assert_eq!(doc["openapi"].as_str().unwrap().get(..3), Some("3.1"));
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, op) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if !["get", "post", "put", "patch", "delete"].contains(&method) {
                continue;
            }
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path:?} has no operationId"));
            out.insert((
                method.to_uppercase(),
                path.as_str().unwrap().to_owned(),
                id.to_owned(),
            ));
        }
    }
    out
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn router_and_openapi_have_the_same_operations(db: PgPool) {
    let app = spawn_app(db).await;
    let served: BTreeSet<_> = app
        .operations
        .iter()
        .map(|op| (op.method.to_string(), op.path.to_owned(), op.id.to_owned()))
        .collect();
    let all = documented();
    let documented: BTreeSet<_> = all
        .iter()
        .filter(|&(_, path, _)| path.starts_with("/v1/"))
        .cloned()
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not served: {extra:?}");

    // The unauthenticated probes are documented and answer.
    for path in ["/healthz", "/readyz"] {
        assert!(
            all.iter().any(|(m, p, _)| m == "GET" && p == path),
            "{path}"
        );
        let status = app.client.get(app.url(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
}

#[test]
fn operation_ids_are_unique_resource_verb_names() {
    let mut ids = BTreeSet::new();
    for (_, path, id) in documented() {
        assert!(ids.insert(id.clone()), "duplicate operationId {id}");
        let parts: Vec<_> = id.split('_').collect();
        assert!(
            parts.len() >= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase())),
            "{id} ({path}) is not resource_verb"
        );
    }
}

#[test]
fn every_error_code_is_documented() {
    let doc = document();
    let codes: BTreeSet<&str> =
        doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
            .as_sequence()
            .expect("Problem.code enum")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
    let ours: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, ours);
}

/// Check `value` against the document's schema `name`: types, required and unknown properties,
/// enums and consts, items, `oneOf` (exactly one) and `$ref`. Enough of JSON Schema for the
/// shapes openapi.yaml uses, so that a field served but not documented, or documented but not
/// served, fails.
pub fn assert_matches_schema(name: &str, value: &serde_json::Value) {
    let doc = document();
    let schema = &doc["components"]["schemas"][name];
    assert!(!schema.is_null(), "no schema {name}");
    if let Err(e) = check(&doc, schema, value, "") {
        panic!("{name} does not describe what is served: {e}\n{value:#}");
    }
}

fn check(doc: &Value, schema: &Value, v: &serde_json::Value, at: &str) -> Result<(), String> {
    use serde_json::Value as J;
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return check(doc, &doc["components"]["schemas"][name], v, at);
    }
    if let Some(alternatives) = schema["oneOf"].as_sequence() {
        let matching = alternatives
            .iter()
            .filter(|s| check(doc, s, v, at).is_ok())
            .count();
        return match matching {
            1 => Ok(()),
            n => Err(format!("{at}: {n} of oneOf match {v}")),
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Sequence(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
        _ => vec![],
    };
    let actual = match v {
        J::Null => "null",
        J::Bool(_) => "boolean",
        J::Number(n) if n.is_i64() || n.is_u64() => "integer",
        J::Number(_) => "number",
        J::String(_) => "string",
        J::Array(_) => "array",
        J::Object(_) => "object",
    };
    let type_ok = types.is_empty()
        || types.contains(&actual)
        || (actual == "integer" && types.contains(&"number"));
    if !type_ok {
        return Err(format!("{at}: {actual} where {types:?} is documented"));
    }
    let as_yaml = |x: &J| serde_yaml::to_value(x).unwrap();
    if let Some(c) = schema.get("const")
        && as_yaml(v) != *c
    {
        return Err(format!("{at}: {v} is not {c:?}"));
    }
    if let Some(e) = schema["enum"].as_sequence()
        && !e.contains(&as_yaml(v))
    {
        return Err(format!("{at}: {v} is not one of {e:?}"));
    }
    match v {
        J::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        J::Object(map) => {
            for key in schema["required"].as_sequence().into_iter().flatten() {
                let key = key.as_str().unwrap();
                if !map.contains_key(key) {
                    return Err(format!("{at}: required `{key}` is not served"));
                }
            }
            for (key, item) in map {
                let path = format!("{at}.{key}");
                match schema["properties"].get(key.as_str()) {
                    Some(s) => check(doc, s, item, &path)?,
                    None => match &schema["additionalProperties"] {
                        Value::Bool(false) => {
                            return Err(format!("{path}: served but not documented"));
                        }
                        Value::Mapping(_) => {
                            check(doc, &schema["additionalProperties"], item, &path)?
                        }
                        _ => {}
                    },
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The report, as the dataset_report operation serves it, holds every warning kind openapi.yaml
/// lists and nothing it does not.
#[test]
fn the_dataset_report_schema_describes_every_warning() {
    use vidtune::db::datasets::{Dataset, DatasetStatus, Video};
    use vidtune::db::videos::{Split, VideoStatus};

    let dataset = Dataset {
        id: uuid::Uuid::new_v4(),
        tenant_id: uuid::Uuid::new_v4(),
        name: "d".into(),
        description: String::new(),
        status: DatasetStatus::Ready,
        status_reason: None,
        classes: None,
        split: serde_json::json!({"train": 0.7, "val": 0.15, "test": 0.15, "seed": 0}),
        cache_spec: serde_json::json!({"short_side": 128, "fps": 15.0}),
        dicom: serde_json::json!({}),
        discard_sources: false,
        videos_total: 7,
        videos_done: 7,
        videos_accepted: 5,
        videos_rejected: 1,
        videos_skipped: 1,
        content_hash: None,
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        updated_at: time::OffsetDateTime::UNIX_EPOCH,
    };
    let video = |path: &str, status, split, patient: Option<&str>, sha: &str| Video {
        id: uuid::Uuid::new_v4(),
        upload_id: uuid::Uuid::new_v4(),
        path: path.into(),
        status,
        reason_code: (status != VideoStatus::Accepted).then(|| "corrupt".into()),
        reason: (status != VideoStatus::Accepted).then(|| "unreadable".into()),
        label: Some("polyp".into()),
        split,
        patient_id: patient.map(Into::into),
        sha256: Some(sha.into()),
        bytes: Some(1000),
        container: Some("mov,mp4,m4a,3gp,3g2,mj2".into()),
        codec: Some("h264".into()),
        width: Some(96),
        height: Some(96),
        fps: Some(15.0),
        duration_s: Some(1.0),
        frames: Some(15),
        cache_frames: Some(15),
        cache_width: Some(128),
        cache_height: Some(128),
        cache_fps: Some(15.0),
        dicom: None,
    };
    let accepted = VideoStatus::Accepted;
    let videos = [
        video("a.mp4", accepted, Some(Split::Train), Some("p1"), "x"),
        video("b.mp4", accepted, Some(Split::Val), Some("p1"), "x"),
        video("c.mp4", accepted, Some(Split::Train), None, "y"),
        video("d.mp4", accepted, Some(Split::Train), None, "y"),
        video("e.mp4", VideoStatus::Rejected, None, None, "z"),
        video("f.txt", VideoStatus::Skipped, None, None, "w"),
        video("g.mp4", VideoStatus::Pending, None, None, "v"),
    ];
    let served = serde_json::to_value(vidtune::ingest::report(&dataset, &videos)).unwrap();
    let mut codes: Vec<&str> = served["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "class_missing_from_split",
            "duplicate_across_splits",
            "duplicate_content",
            "few_videos_in_class",
            "patient_in_two_splits",
            "short_videos",
            "single_class",
        ]
    );
    assert_matches_schema("DatasetReport", &served);

    // And with nothing accepted: null summaries, no warnings.
    let served = serde_json::to_value(vidtune::ingest::report(&dataset, &videos[4..])).unwrap();
    assert_matches_schema("DatasetReport", &served);
}
