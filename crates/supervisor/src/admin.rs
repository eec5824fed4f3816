//! Admin endpoint (placeholder until branch `admin` lands).

use crate::api::ApiClient;

pub async fn serve_admin(_listener: tokio::net::TcpListener, _api: ApiClient) {}
