//! Bearer tokens of the generic API: HS256 JWTs signed with
//! `BOTLINE_JWT_SECRET`, with an `exp` claim, and an `aud` claim when
//! `[ingest] jwt_audience` is set. Each refusal says which check failed.

use crate::error::IngestError;
use axum::http::{header, HeaderMap};
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

pub struct JwtAuth {
    key: DecodingKey,
    validation: Validation,
}

impl JwtAuth {
    pub fn new(secret: &str, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "aud"]);
            }
            None => validation.validate_aud = false,
        }
        JwtAuth {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Check the `Authorization: Bearer …` header of a request.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), IngestError> {
        let token = bearer(headers)?;
        refuse_unsigned(token)?;
        jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map(|_| ())
            .map_err(|error| IngestError::Unauthorized(reason(error.kind())))
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, IngestError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| IngestError::Unauthorized("missing bearer token".into()))?;
    let value = value
        .to_str()
        .map_err(|_| IngestError::Unauthorized("malformed Authorization header".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| IngestError::Unauthorized("missing bearer token".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(IngestError::Unauthorized("missing bearer token".into()));
    }
    Ok(token.trim())
}

/// `alg: none` is refused by name (the library would only call it malformed).
fn refuse_unsigned(token: &str) -> Result<(), IngestError> {
    let header = token.split('.').next().unwrap_or_default();
    let algorithm = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|header| {
            header
                .get("alg")
                .and_then(|alg| alg.as_str().map(str::to_owned))
        });
    match algorithm {
        Some(algorithm) if algorithm.eq_ignore_ascii_case("none") => Err(
            IngestError::Unauthorized("unsigned token (alg none) refused".into()),
        ),
        Some(algorithm) if algorithm != "HS256" => Err(IngestError::Unauthorized(format!(
            "token algorithm {algorithm} refused: only HS256 is accepted"
        ))),
        _ => Ok(()),
    }
}

fn reason(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::InvalidSignature => "token signature does not verify".into(),
        ErrorKind::InvalidAudience => "token audience not accepted".into(),
        ErrorKind::ImmatureSignature => "token not valid yet".into(),
        ErrorKind::InvalidAlgorithm => "token algorithm refused: only HS256 is accepted".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("token has no `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("token claim `{claim}` is malformed"),
        _ => "malformed token".into(),
    }
}
