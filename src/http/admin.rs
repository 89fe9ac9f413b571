//! Tenants, API keys, the caller's own identity and the audit trail.
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::{Json, Path, Query};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, Routes};
use crate::app::AppState;
use crate::db::{self, tenants::ApiKey, tenants::Tenant};
use axum::extract::State;

pub fn routes(r: Routes) -> Routes {
    use Access::{Admin, Tenant};
    r.op(Method::GET, "/v1/me", "caller_view", Tenant, caller_view)
        .op(
            Method::GET,
            "/v1/tenants",
            "tenant_list",
            Admin,
            tenant_list,
        )
        .op(
            Method::POST,
            "/v1/tenants",
            "tenant_create",
            Admin,
            tenant_create,
        )
        .op(
            Method::GET,
            "/v1/tenants/{tenant_id}",
            "tenant_view",
            Admin,
            tenant_view,
        )
        .op(
            Method::POST,
            "/v1/tenants/{tenant_id}/keys",
            "key_create",
            Admin,
            key_create,
        )
        .op(Method::GET, "/v1/keys", "key_list", Tenant, key_list)
        .op(
            Method::GET,
            "/v1/keys/{key_id}",
            "key_view",
            Tenant,
            key_view,
        )
        .op(
            Method::DELETE,
            "/v1/keys/{key_id}",
            "key_revoke",
            Admin,
            key_revoke,
        )
        .op(
            Method::GET,
            "/v1/audit-events",
            "audit_event_list",
            Admin,
            audit_event_list,
        )
}

#[derive(Serialize)]
struct CallerView {
    tenant: TenantRef,
    key_id: Uuid,
    key_prefix: String,
    admin: bool,
}

#[derive(Serialize)]
struct TenantRef {
    id: Uuid,
    name: String,
}

/// Who am I: the tenant and key behind the request.
async fn caller_view(caller: Caller) -> Json<CallerView> {
    Json(CallerView {
        tenant: TenantRef {
            id: caller.tenant_id,
            name: caller.tenant_name,
        },
        key_id: caller.key_id,
        key_prefix: caller.key_prefix,
        admin: caller.admin,
    })
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

async fn tenant_list(State(s): State<AppState>) -> ApiResult<Json<Items<Tenant>>> {
    Ok(Json(Items {
        items: db::tenants::list_tenants(&s.db).await?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantCreate {
    name: String,
}

/// Tenant names are short, lowercase and URL-safe, so they read well in logs and paths.
fn validate_tenant_name(name: &str) -> ApiResult<()> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b"_.-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(
            "name",
            "1-63 characters: lowercase letters, digits, and (not first) `_`, `.`, `-`",
        ))
    }
}

async fn tenant_create(
    State(s): State<AppState>,
    Json(body): Json<TenantCreate>,
) -> ApiResult<impl IntoResponse> {
    validate_tenant_name(&body.name)?;
    let tenant = db::tenants::create_tenant(&s.db, &body.name)
        .await
        .map_err(|e| on_unique(e, "a tenant with this name already exists"))?;
    Ok((
        StatusCode::CREATED,
        [(
            axum::http::header::LOCATION,
            format!("/v1/tenants/{}", tenant.id),
        )],
        AuditResource(tenant.id),
        Json(tenant),
    ))
}

async fn tenant_view(
    State(s): State<AppState>,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<Tenant>> {
    db::tenants::get_tenant(&s.db, tenant_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("tenant"))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyCreate {
    #[serde(default)]
    name: String,
    #[serde(default)]
    admin: bool,
}

/// A new key: the only response that ever contains the secret.
#[derive(Serialize)]
struct CreatedKey {
    #[serde(flatten)]
    record: ApiKey,
    key: String,
}

async fn key_create(
    State(s): State<AppState>,
    Path(tenant_id): Path<Uuid>,
    Json(body): Json<KeyCreate>,
) -> ApiResult<impl IntoResponse> {
    if body.name.len() > 100 {
        return Err(ApiError::validation("name", "at most 100 characters"));
    }
    db::tenants::get_tenant(&s.db, tenant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    let minted = crate::auth::mint();
    let record = db::tenants::insert_key(
        &s.db,
        tenant_id,
        &body.name,
        &minted.prefix,
        &minted.digest,
        body.admin,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        [(
            axum::http::header::LOCATION,
            format!("/v1/keys/{}", record.id),
        )],
        AuditResource(record.id),
        Json(CreatedKey {
            record,
            key: minted.secret,
        }),
    ))
}

/// The keys of the caller's tenant.
async fn key_list(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Items<ApiKey>>> {
    Ok(Json(Items {
        items: db::tenants::list_keys(&s.db, caller.tenant_id).await?,
    }))
}

async fn key_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(key_id): Path<Uuid>,
) -> ApiResult<Json<ApiKey>> {
    db::tenants::get_key(&s.db, caller.tenant_id, key_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("key"))
}

/// Revoke any tenant's key (admin). Idempotent.
async fn key_revoke(
    State(s): State<AppState>,
    Path(key_id): Path<Uuid>,
) -> ApiResult<Json<ApiKey>> {
    db::tenants::revoke_key(&s.db, key_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("key"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    tenant_id: Option<Uuid>,
    before: Option<i64>,
    limit: Option<i64>,
}

async fn audit_event_list(
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Items<db::audit::AuditEvent>>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit", "between 1 and 1000"));
    }
    Ok(Json(Items {
        items: db::audit::list(&s.db, q.tenant_id, q.before, limit).await?,
    }))
}

/// Turn a unique-constraint violation into 409, anything else into the usual mapping.
pub(crate) fn on_unique(e: sqlx::Error, detail: &str) -> ApiError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => ApiError::conflict(detail),
        _ => e.into(),
    }
}
