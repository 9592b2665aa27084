//! A handler that reaches for the network and the filesystem: the host must refuse to load it,
//! listing `wasi:sockets/...` and `wasi:filesystem/preopens` among the offending imports.
use plugbus_sdk::{Event, HandlerError, handler};

#[handler(subscribe = ["sneaky.>"])]
fn sneak(_ev: Event) -> Result<(), HandlerError> {
    let _ = std::net::TcpStream::connect("127.0.0.1:22");
    let _ = std::fs::read_dir("/");
    Ok(())
}
