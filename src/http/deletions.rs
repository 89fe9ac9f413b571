//! Deletions: the 202 answer every delete gives (its files are removed in the background, and
//! resumed after a restart) and the view that says when they are gone.
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::IntoResponse;
use uuid::Uuid;

use super::extract::{Json, Path};
use super::{
    Access, ApiError, ApiResult, AppState, AuditDetails, AuditResource, Caller, ErrorCode, Routes,
};
use crate::db::{self, deletions::Deletion, deletions::Requester};
use crate::retention::{DeleteError, InUse};

pub fn routes(r: Routes) -> Routes {
    r.op(
        Method::GET,
        "/v1/deletions/{deletion_id}",
        "deletion_view",
        Access::Tenant,
        deletion_view,
    )
}

impl From<DeleteError> for ApiError {
    fn from(e: DeleteError) -> Self {
        match e {
            DeleteError::NotFound(what) => ApiError::not_found(what),
            e @ DeleteError::Busy(_) => ApiError::conflict(e.to_string()),
            DeleteError::InUse(what) => {
                let code = match what {
                    InUse::Dataset => ErrorCode::DatasetInUse,
                    InUse::Model => ErrorCode::ModelInUse,
                    InUse::BaseModel => ErrorCode::BaseModelInUse,
                    InUse::Tenant => ErrorCode::TenantInUse,
                };
                ApiError::new(code, what.to_string())
            }
            e @ DeleteError::OwnTenant => ApiError::conflict(e.to_string()),
            DeleteError::Database(e) => e.into(),
        }
    }
}

/// Who asks: the caller's key and this request's id, kept with the deletion.
pub(super) fn requester(caller: &Caller) -> Requester {
    Requester {
        key_id: Some(caller.key_id),
        request_id: super::error::REQUEST_ID.try_with(Clone::clone).ok(),
    }
}

/// 202: the rows are gone, the files are being removed; `Location` tells when they are.
pub(super) fn accepted(d: Deletion) -> impl IntoResponse {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/deletions/{}", d.id))],
        AuditResource(d.resource_id),
        AuditDetails(serde_json::json!({ "deletion_id": d.id, "kind": d.kind })),
        Json(d),
    )
}

/// A deletion of the caller's tenant (operators: any), with `completed_at` once its files are
/// gone.
async fn deletion_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Deletion>> {
    db::deletions::get(&s.db, caller.tenant_id, caller.operator, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("deletion"))
}
