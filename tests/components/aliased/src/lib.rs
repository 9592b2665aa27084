//! A hostile plugin whose `manifest()` lists a million `publishes` patterns that are all the
//! same 16 MiB of its memory: the canonical ABI lets a list's strings point at one place, and
//! lifted into host strings one by one they would be 16 TiB (review 60b C1). The host reads the
//! manifest under the per-call copy limit (hostcall fuel), so the read fails and the file is
//! refused. Written against the bindings directly (the `#[handler]` attribute builds its
//! manifest from literals).
#![cfg(target_arch = "wasm32")]

use plugbus_sdk::__private as p;
use std::mem::ManuallyDrop;

#[unsafe(link_section = "plugbus-contract")]
#[used]
static CONTRACT: [u8; p::CONTRACT_SECTION.len()] = p::CONTRACT_SECTION;

const ALIASES: usize = 1_000_000;
const BYTES: usize = 16 << 20;

/// `ALIASES` strings over one buffer of `BYTES` (never freed: the host's post-return would free
/// each alias, and the guest is thrown away with its store anyway).
fn aliased() -> Vec<String> {
    let one = ManuallyDrop::new(vec![b'a'; BYTES]);
    let ptr = one.as_ptr() as *mut u8;
    // SAFETY: none of these strings is ever written to; each is read by the canonical ABI's
    // lowering only. (Their drops after the call would free one buffer many times: the store
    // is dropped first.)
    (0..ALIASES).map(|_| unsafe { String::from_raw_parts(ptr, BYTES, BYTES) }).collect()
}

struct Aliased;

impl p::Guest for Aliased {
    fn manifest() -> p::Manifest {
        p::Manifest { name: "aliased".into(), version: "0.1.0".into(), subscriptions: Vec::new(), publishes: aliased() }
    }

    fn handle(_: p::WitEvent) -> Result<(), p::WitHandlerError> {
        Ok(())
    }
}

impl p::OutboundGuest for Aliased {
    fn requested() -> Vec<String> {
        aliased()
    }
}

plugbus_sdk::__bindings::__export_plugin!(Aliased);
