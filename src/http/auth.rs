//! API-key authentication: `Authorization: Bearer <key>` → [`Caller`].
use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, header, request::Parts};
use sqlx::PgPool;
use uuid::Uuid;

use super::error::ApiError;
use crate::{auth, db};

/// The authenticated identity of a `/v1` request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub key_id: Uuid,
    pub key_prefix: String,
    /// Manages its own tenant's keys and reads its own tenant's audit trail.
    pub admin: bool,
    /// Manages every tenant and what they share (implies `admin`).
    pub operator: bool,
}

impl Caller {
    /// Whether this caller administers `tenant_id`: an operator every tenant, an admin only its
    /// own. Handlers answer 404 (not 403) otherwise, as for any other tenant's resource, so a
    /// tenant admin cannot even learn which tenant ids exist.
    pub fn administers(&self, tenant_id: Uuid) -> bool {
        self.operator || (self.admin && self.tenant_id == tenant_id)
    }
}

/// Resolve the bearer key in `headers`, refusing missing, malformed, unknown and revoked keys.
pub async fn authenticate(db: &PgPool, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthenticated("missing `Authorization: Bearer <key>` header"))?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be `Bearer <key>`")
        })?;
    if !auth::looks_like_key(key) {
        return Err(ApiError::unauthenticated("invalid API key"));
    }
    let owner = db::tenants::authenticate(db, &auth::digest(key))
        .await?
        .ok_or_else(|| ApiError::unauthenticated("invalid API key"))?;
    if owner.revoked {
        return Err(ApiError::unauthenticated("this API key has been revoked"));
    }
    let role = owner.role();
    Ok(Caller {
        tenant_id: owner.tenant_id,
        tenant_name: owner.tenant_name,
        key_id: owner.key_id,
        key_prefix: owner.key_prefix,
        admin: role.is_admin(),
        operator: role.is_operator(),
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!(
                "Caller extracted on a route not declared through http::Routes"
            ))
        })
    }
}
