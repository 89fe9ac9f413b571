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
