//! Base models: the built-in architectures with their input specs and installed weights,
//! pretrained weight import (operator), and tenants' own TorchScript backbones (operator, or
//! any key with `VIDTUNE_TENANT_BACKBONES`).
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path};
use super::upload::{UploadCap, receive};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, ErrorCode, Items, Routes};
use crate::backbone::Arch;
use crate::config::Settings;
use crate::datadir::DataDir;
use crate::datadir::PartialFile;
use crate::db;
use crate::registry::{self, ImportError};

pub fn routes(r: Routes) -> Routes {
    r.op(
        Method::GET,
        "/v1/base-models",
        "base_model_list",
        Access::Tenant,
        base_model_list,
    )
    .streaming_op(
        Method::POST,
        "/v1/base-models",
        "base_model_create",
        Access::Tenant,
        base_model_create,
    )
    .op(
        Method::DELETE,
        "/v1/base-models/{base_model_id}",
        "base_model_delete",
        Access::Tenant,
        base_model_delete,
    )
    .streaming_op(
        Method::POST,
        "/v1/base-models/{arch}/weights",
        "weights_import",
        Access::Operator,
        weights_import,
    )
}

impl From<ImportError> for ApiError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Invalid(msg) => ApiError::new(ErrorCode::InvalidModelFile, msg),
            ImportError::Field { field, message } => ApiError::validation(field, message),
            ImportError::NameTaken => ApiError::conflict(e.to_string()),
            ImportError::Other(e) => ApiError::internal(e),
        }
    }
}

/// Built-in architectures first, then the tenant's TorchScript backbones.
async fn base_model_list(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Items<Value>>> {
    let installed = db::base_models::latest_weights(&s.db).await?;
    let mut items: Vec<Value> = Arch::ALL
        .iter()
        .map(|a| {
            let w = installed.iter().find(|w| w.arch == a.name());
            json!({
                "name": a.name(),
                "kind": "builtin",
                "family": if a.is_video() { "video" } else { "image_tsn" },
                "pretrained_on": a.pretrained_on(),
                "feature_dim": a.feature_dim(),
                "stages": a.stages().len(),
                "preprocessing": a.preprocessing(),
                "weights": {
                    "installed": w.is_some(),
                    "sha256": w.map(|w| w.sha256.clone()),
                    "source": w.map(|w| w.source.clone()),
                    "official_url": a.official_weights(),
                },
            })
        })
        .collect();
    for b in db::base_models::list_custom(&s.db, caller.tenant_id).await? {
        items.push(json!({
            "name": b.name,
            "id": b.id,
            "kind": "torchscript",
            "description": b.description,
            "feature_dim": b.feature_dim,
            "stages": 1,
            "preprocessing": b.preprocessing,
            "sha256": b.sha256,
            "weights": { "installed": true },
        }));
    }
    Ok(Json(Items { items }))
}

/// Install pretrained weights for a built-in architecture: the body is a torchvision-format
/// `.pth` or a `.safetensors` file (raw, or multipart field `file`).
async fn weights_import(
    State(s): State<AppState>,
    Path(arch): Path<String>,
    req: Request,
) -> ApiResult<impl IntoResponse> {
    let arch = Arch::parse(&arch).ok_or_else(|| ApiError::not_found("base model"))?;
    let tmp = s.data.weights_incoming().join(Uuid::new_v4().to_string());
    let _cleanup = PartialFile::new(tmp.clone());
    let incoming = receive(&s, req, &tmp, s.settings.max_video_bytes).await?;
    let source = incoming
        .file_name
        .unwrap_or_else(|| format!("upload {}", &incoming.received.sha256[..12]));
    let w = registry::import_weights(&s.db, &s.settings.data_dir, arch, &tmp, &source).await?;
    Ok((StatusCode::CREATED, AuditResource(w.id), Json(w)))
}

/// Whether `caller` may register a TorchScript backbone. A backbone is code that the server
/// runs (to inspect it, then to train and predict), so by default only operators may; with
/// `tenant_backbones` every key may. The one place this decision is made.
fn may_register_backbone(settings: &Settings, caller: &Caller) -> bool {
    caller.operator || settings.tenant_backbones
}

/// Register a TorchScript backbone: multipart `file` (from `torch.jit.trace`/`script`), `name`,
/// optional `description` and `preprocessing` (JSON). Contract: input `[N, 3, T, H, W]` float,
/// output `[N, D]` features.
async fn base_model_create(
    State(s): State<AppState>,
    caller: Caller,
    req: Request,
) -> ApiResult<impl IntoResponse> {
    // Refused before a byte of the upload is read or written.
    if !may_register_backbone(&s.settings, &caller) {
        return Err(ApiError::forbidden(
            "registering a TorchScript backbone needs an operator key \
             (or a server started with VIDTUNE_TENANT_BACKBONES=true)",
        ));
    }
    let id = Uuid::new_v4();
    let rel = DataDir::backbone_relative(id);
    let dest = s.data.resolve(&rel);
    let cap = UploadCap::of(&s, caller.tenant_id, s.settings.max_video_bytes).await?;
    let partial = PartialFile::new(dest.clone());
    let incoming = receive(&s, req, &dest, cap.bytes)
        .await
        .map_err(|e| cap.explain(e))?;
    let new = registry::NewBackbone {
        id,
        tenant_id: caller.tenant_id,
        name: incoming.field("name").unwrap_or_default(),
        description: incoming.field("description").unwrap_or_default(),
        preprocessing: incoming.field("preprocessing"),
        module: &rel,
        sha256: &incoming.received.sha256,
        bytes: incoming.received.bytes,
    };
    let b = registry::register_backbone(&s.db, &s.data, &new, s.settings.inspect_timeout).await?;
    partial.keep();
    Ok((StatusCode::CREATED, AuditResource(b.id), Json(b)))
}

/// Delete one of the tenant's TorchScript backbones: its record now, its module file in the
/// background (202). Refused (`base_model_in_use`) while a model or an unfinished job uses it:
/// a model needs its backbone to serve.
async fn base_model_delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<impl IntoResponse> {
    let by = super::deletions::requester(&caller);
    let d = crate::retention::delete_backbone(&s.db, &s.data, caller.tenant_id, id, &by).await?;
    Ok(super::deletions::accepted(d))
}
