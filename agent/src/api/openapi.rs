//! The OpenAPI document, generated from the handlers.

use crate::api::{
    __path_attach_volume, __path_audit_log, __path_ca_certificate, __path_cluster,
    __path_create_project, __path_create_token, __path_create_user, __path_create_vm,
    __path_delete_issuer, __path_delete_project, __path_delete_vm, __path_delete_volume,
    __path_detach_volume, __path_drain_node, __path_grant_role, __path_healthz, __path_join,
    __path_list_issuers, __path_list_projects, __path_list_tokens, __path_list_users,
    __path_list_vms, __path_list_volumes, __path_login, __path_nodes, __path_put_issuer,
    __path_readyz, __path_resume_node, __path_revoke_token, __path_set_node_zone, __path_set_quota,
    __path_show_node, __path_show_project, __path_show_vm, __path_show_volume,
    __path_update_project, __path_zones, network, routes, storage, users, vms, volumes, ErrorBody,
    ErrorDetail,
};
use crate::api_types::AuditFormat;
use axum::response::{IntoResponse, Response};

#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "This document", body = Object)))]
pub(super) async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOCUMENT.get_or_init(openapi_pretty);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.as_str(),
    )
        .into_response()
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Allod API",
        description = "The tenant and operator API of an Allod cluster. Every route but the \
            public ones takes `Authorization: Bearer <token>`: an API token (`allod token \
            create`, `allod login`) or an OIDC access token of a configured issuer. Errors are \
            `{\"error\":{\"code\",\"message\"}}`. Reads are linearizable; any GET may \
            instead take `?consistency=stale` to be answered from what the node it reaches has \
            applied, without asking the leader (such an answer carries `Allod-Consistency: \
            stale` and `Allod-Applied-Index`); `consistency=linearizable` is the default."
    ),
    paths(
        super::exports::create_export,
        users::update_user,
        users::delete_user,
        users::revoke_role,
        healthz,
        readyz,
        openapi_json,
        ca_certificate,
        join,
        login,
        cluster,
        nodes,
        show_node,
        drain_node,
        resume_node,
        storage::storage_status,
        storage::set_storage_config,
        storage::request_scrub,
        set_node_zone,
        zones,
        list_projects,
        create_project,
        show_project,
        update_project,
        delete_project,
        set_quota,
        list_volumes,
        volumes::create_volume,
        show_volume,
        delete_volume,
        volumes::resize_volume,
        volumes::list_snapshots,
        volumes::create_snapshot,
        volumes::delete_snapshot,
        volumes::rollback_volume,
        volumes::clone_volume,
        volumes::import_image,
        volumes::list_images,
        volumes::show_image,
        volumes::delete_image,
        list_vms,
        create_vm,
        show_vm,
        delete_vm,
        attach_volume,
        detach_volume,
        vms::start_vm,
        vms::stop_vm,
        vms::force_stop_vm,
        vms::reboot_vm,
        vms::migrate_vm,
        vms::update_vm,
        vms::console,
        list_users,
        create_user,
        grant_role,
        list_tokens,
        create_token,
        revoke_token,
        audit_log,
        list_issuers,
        put_issuer,
        delete_issuer,
        network::list_pools,
        network::create_pool,
        network::list_vpcs,
        network::create_vpc,
        network::delete_vpc,
        network::list_subnets,
        network::create_subnet,
        network::list_security_groups,
        network::create_security_group,
        network::delete_security_group,
        network::add_rule,
        network::delete_rule,
        network::list_ports,
        network::create_port,
        network::delete_port,
        network::list_fips,
        network::allocate_fip,
        network::bind_fip,
        network::release_fip
    ),
    components(schemas(ErrorBody, ErrorDetail, AuditFormat))
)]
struct ApiDoc;

/// The API's OpenAPI 3 document. Which routes need a token comes from the
/// same permission table the middleware enforces, and every operation
/// documents the error body as its `default` answer.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    use utoipa::OpenApi as _;
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.info.license = Some(utoipa::openapi::License::new("Apache-2.0"));
    let (_, table) = routes().finish();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        utoipa::openapi::security::SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("An Allod API token or an OIDC access token"))
                .build(),
        ),
    );
    let error = ResponseBuilder::new()
        .description("The request was refused or failed; the body says why")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            (axum::http::Method::GET, &mut item.get),
            (axum::http::Method::POST, &mut item.post),
            (axum::http::Method::PUT, &mut item.put),
            (axum::http::Method::PATCH, &mut item.patch),
            (axum::http::Method::DELETE, &mut item.delete),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            let public = matches!(
                table.get(&method, path),
                Some(crate::api::authz::Permission::Public) | None
            );
            if !public {
                operation.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
            }
            operation
                .responses
                .responses
                .insert("default".into(), RefOr::T(error.clone()));
        }
    }
    doc
}

/// [`openapi`] as the pretty JSON that is served and committed.
pub fn openapi_pretty() -> String {
    let mut text = openapi().to_pretty_json().expect("the document serialises");
    text.push('\n');
    text
}
