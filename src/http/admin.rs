//! Tenants, API keys, the caller's own identity and the audit trail.
//!
//! Roles: operators create and list tenants and administer every tenant; an admin administers
//! only its own tenant, and another tenant's id answers 404 to it as to any tenant key.
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::error::on_unique;
use super::extract::{Json, Path, Query};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, Items, Routes};
use crate::auth::Role;
use crate::db::{self, tenants::ApiKey, tenants::Tenant};
use crate::quota;
use axum::extract::State;

pub fn routes(r: Routes) -> Routes {
    use Access::{Admin, Operator, Tenant};
    r.op(Method::GET, "/v1/me", "caller_view", Tenant, caller_view)
        .op(
            Method::GET,
            "/v1/tenants",
            "tenant_list",
            Operator,
            tenant_list,
        )
        .op(
            Method::POST,
            "/v1/tenants",
            "tenant_create",
            Operator,
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
            Method::PATCH,
            "/v1/tenants/{tenant_id}",
            "tenant_update",
            Operator,
            tenant_update,
        )
        .op(Method::GET, "/v1/usage", "usage_view", Tenant, usage_view)
        .op(
            Method::GET,
            "/v1/tenants/{tenant_id}/usage",
            "tenant_usage_view",
            Admin,
            tenant_usage_view,
        )
        .op(
            Method::DELETE,
            "/v1/tenants/{tenant_id}",
            "tenant_delete",
            Operator,
            tenant_delete,
        )
        .op(
            Method::GET,
            "/v1/tenants/{tenant_id}/keys",
            "tenant_key_list",
            Admin,
            tenant_key_list,
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
    operator: bool,
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
        operator: caller.operator,
    })
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

/// A tenant the caller administers; any other answers 404, whether it exists or not.
async fn administered_tenant(s: &AppState, caller: &Caller, tenant_id: Uuid) -> ApiResult<Tenant> {
    if !caller.administers(tenant_id) {
        return Err(ApiError::not_found("tenant"));
    }
    db::tenants::get_tenant(&s.db, tenant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))
}

async fn tenant_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<Tenant>> {
    Ok(Json(administered_tenant(&s, &caller, tenant_id).await?))
}

/// What an operator may change about a tenant.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantUpdate {
    /// Bytes; `null` returns the tenant to the server's default quota.
    #[serde(default, deserialize_with = "super::extract::explicit_null")]
    storage_quota_bytes: Option<Option<i64>>,
}

async fn tenant_update(
    State(s): State<AppState>,
    Path(tenant_id): Path<Uuid>,
    Json(body): Json<TenantUpdate>,
) -> ApiResult<Json<Tenant>> {
    let tenant = match body.storage_quota_bytes {
        None => db::tenants::get_tenant(&s.db, tenant_id).await?,
        Some(Some(q)) if q < 0 => {
            return Err(ApiError::validation(
                "storage_quota_bytes",
                "a number of bytes, 0 or more, or null for the server's default",
            ));
        }
        Some(q) => db::tenants::set_storage_quota(&s.db, tenant_id, q).await?,
    };
    Ok(Json(tenant.ok_or_else(|| ApiError::not_found("tenant"))?))
}

/// The caller's tenant's storage against its quota.
async fn usage_view(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<quota::Usage>> {
    Ok(Json(
        quota::usage(&s.db, s.settings.tenant_quota_bytes, caller.tenant_id).await?,
    ))
}

/// The storage of a tenant the caller administers.
async fn tenant_usage_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<quota::Usage>> {
    let tenant = administered_tenant(&s, &caller, tenant_id).await?;
    Ok(Json(
        quota::usage(&s.db, s.settings.tenant_quota_bytes, tenant.id).await?,
    ))
}

/// Delete a tenant with its keys, datasets, jobs, models and backbones (202; the files go in the
/// background, the audit trail stays). Refused while it has queued or running work
/// (`tenant_in_use`), and for the caller's own tenant.
async fn tenant_delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<impl IntoResponse> {
    let by = super::deletions::requester(&caller);
    let d = crate::retention::delete_tenant(&s.db, &s.data, caller.tenant_id, id, &by).await?;
    Ok(super::deletions::accepted(d))
}

/// The keys of a tenant the caller administers (operators: any tenant).
async fn tenant_key_list(
    State(s): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<Items<ApiKey>>> {
    let tenant = administered_tenant(&s, &caller, tenant_id).await?;
    Ok(Json(Items {
        items: db::tenants::list_keys(&s.db, tenant.id).await?,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyCreate {
    #[serde(default)]
    name: String,
    #[serde(default)]
    admin: bool,
    /// Accepted only as `false`: named so that asking for it is refused with a reason rather
    /// than as an unknown field.
    #[serde(default)]
    operator: bool,
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
    caller: Caller,
    Path(tenant_id): Path<Uuid>,
    Json(body): Json<KeyCreate>,
) -> ApiResult<impl IntoResponse> {
    let tenant = administered_tenant(&s, &caller, tenant_id).await?;
    // Not even an operator mints operators over HTTP: a leaked operator key must not be able to
    // make more of itself, and the host's shell is the one place the role is granted.
    if body.operator {
        return Err(ApiError::forbidden(
            "`operator` keys are made only on the host with `vidtune keys create --operator`",
        ));
    }
    if body.name.chars().count() > 100 {
        return Err(ApiError::validation("name", "at most 100 characters"));
    }
    let role = if body.admin {
        Role::Admin
    } else {
        Role::Member
    };
    let minted = crate::auth::mint();
    let record = db::tenants::insert_key(
        &s.db,
        tenant.id,
        &body.name,
        &minted.prefix,
        &minted.digest,
        role,
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

/// Revoke a key: an operator any tenant's, an admin its own tenant's. Idempotent.
async fn key_revoke(
    State(s): State<AppState>,
    caller: Caller,
    Path(key_id): Path<Uuid>,
) -> ApiResult<Json<ApiKey>> {
    let scope = (!caller.operator).then_some(caller.tenant_id);
    if !caller.operator {
        let key = db::tenants::get_key(&s.db, caller.tenant_id, key_id)
            .await?
            .ok_or_else(|| ApiError::not_found("key"))?;
        // An operator key may sit in an admin's tenant; the admin must not lock the operator out.
        if key.operator {
            return Err(ApiError::forbidden(
                "only an operator key may revoke an operator key",
            ));
        }
    }
    db::tenants::revoke_key(&s.db, scope, key_id)
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

/// The audit trail: an operator's of every tenant (or `tenant_id`'s), an admin's of its own
/// tenant only.
async fn audit_event_list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Items<db::audit::AuditEvent>>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit", "between 1 and 1000"));
    }
    let tenant_id = match q.tenant_id {
        Some(t) if !caller.administers(t) => return Err(ApiError::not_found("tenant")),
        Some(t) => Some(t),
        None if caller.operator => None,
        None => Some(caller.tenant_id),
    };
    Ok(Json(Items {
        items: db::audit::list(&s.db, tenant_id, q.before, limit).await?,
    }))
}
