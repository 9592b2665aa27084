//! Caps on the strings a guest's `wasi:http` request handles keep in the host. Each host call
//! copies at most the call's byte bound into the host, but wasmtime-wasi-http keeps a request's
//! authority and method (checked for their characters only) for as long as the guest holds the
//! handle: a thousand handles, each given a 4 MiB authority and method, held gigabytes outside
//! every memory limit, in one attempt (review 59d F1). The setters are shadowed here: past its
//! cap a value is refused as an invalid one is (`result::err`), and nothing of it is kept.

use super::limits::{MAX_HTTP_AUTHORITY_BYTES, MAX_HTTP_METHOD_BYTES, MAX_HTTP_PATH_BYTES};
use super::state::HostState;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{HostOutgoingRequest, Method, OutgoingRequest};

/// The `wasi:http/types` instance wasmtime-wasi-http defines (a guest's older 0.2 import is
/// linked to it).
const TYPES: &str = "wasi:http/types@0.2.12";

/// Shadows `outgoing-request`'s `set-authority`, `set-method` and `set-path-with-query` in
/// `linker` (which has wasi:http) with versions that refuse a value past its cap.
pub(super) fn cap_request_strings(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(TYPES)?;
    types.func_wrap(
        "[method]outgoing-request.set-authority",
        |mut store, (request, authority): (Resource<OutgoingRequest>, Option<String>)| {
            if authority.as_ref().is_some_and(|a| a.len() > MAX_HTTP_AUTHORITY_BYTES) {
                return Ok((Err(()),));
            }
            Ok((store.data_mut().http().set_authority(request, authority)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-method",
        |mut store, (request, method): (Resource<OutgoingRequest>, Method)| {
            if matches!(&method, Method::Other(m) if m.len() > MAX_HTTP_METHOD_BYTES) {
                return Ok((Err(()),));
            }
            Ok((store.data_mut().http().set_method(request, method)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-path-with-query",
        |mut store, (request, path): (Resource<OutgoingRequest>, Option<String>)| {
            if path.as_ref().is_some_and(|p| p.len() > MAX_HTTP_PATH_BYTES) {
                return Ok((Err(()),));
            }
            Ok((store.data_mut().http().set_path_with_query(request, path)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
