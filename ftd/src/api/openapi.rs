//! The OpenAPI 3 document, generated from the handlers and the model; a
//! copy is kept in the repository (`ftd/openapi.json`) and a test keeps
//! the two equal.

use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::model;

#[derive(OpenApi)]
#[openapi(
    info(title = "ftd", description = "The node manager of a fault-tolerant VM pair"),
    paths(
        super::health,
        super::nodes::list,
        super::nodes::show,
        super::nodes::enter_maintenance,
        super::nodes::exit_maintenance,
        super::vms::list,
        super::vms::create,
        super::vms::show,
        super::vms::delete,
        super::vms::start,
        super::vms::stop,
        super::vms::protect,
        super::vms::unprotect,
        super::vms::takeover,
        super::vms::switchover,
        super::vms::engine,
        super::events::list,
        super::events::stream,
        super::events::audit,
        super::pair::show,
        super::pair::set_peer,
        super::session::log_in,
        super::session::show,
        super::session::log_out,
        super::stats::stream_vm,
        super::users::list,
        super::users::set,
        super::users::delete,
    ),
    components(schemas(
        model::Level,
        model::DiskSpec,
        model::NicSpec,
        model::FtOptions,
        model::VmCreate,
        model::VmDefinition,
        model::Desired,
        model::VmState,
        model::VmView,
        model::RoleView,
        model::NodeView,
        model::NodeState,
        model::Maintenance,
        model::Severity,
        model::Event,
        model::AuditEntry,
        model::ErrorBody,
        model::PairInfo,
        model::SessionLogin,
        model::SessionView,
        model::VmSample,
        model::SyncView,
        model::UserView,
        model::UserPassword,
        crate::config::NodeAddresses,
    )),
    modifiers(&BearerToken),
    tags(
        (name = "vms", description = "VM definitions and their life"),
        (name = "nodes", description = "The pair's nodes and their maintenance"),
        (name = "events", description = "Events, alerts and the audit log"),
        (name = "node", description = "This daemon"),
        (name = "console", description = "The web console's login and users"),
    )
)]
struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as pretty JSON (what `/api/openapi.json` serves).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

pub async fn serve() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
}
