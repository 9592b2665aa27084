//! The `#[handler]` attribute of `plugbus-sdk`; see that crate's documentation.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::{Expr, ExprArray, ExprLit, ItemFn, Lit, LitStr, parse_macro_input};

/// Turns `fn(Event) -> Result<(), HandlerError>` into a plugbus plugin component.
///
/// Options: `subscribe = [..]` (required), `publishes = [..]`, `outbound = [..]` (HTTP
/// destinations, `scheme://host[:port]`), `name = ".."` (default: the crate
/// name), `version = ".."` (default: the crate version), `queue_group = ".."`,
/// `order_by_header = ".."` or `order_by_token = N`, `durable = true`, `deliver = "all" | "new"`.
///
/// The function stays an ordinary function, callable by its own name. On the native target
/// (`cargo test`) it declares its manifest to `plugbus_sdk::testing::TestHost` when called, so a
/// test applies the same `publishes` allow-list and subscriptions as the host; on `wasm32` the
/// attribute adds the component's exports (`manifest()` and `handle()`) instead.
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = parse_macro_input!(item as ItemFn);
    let mut opts = Options::default();
    let parser = syn::meta::parser(|meta| opts.parse(meta));
    parse_macro_input!(attr with parser);
    match expand(opts, func) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Options {
    subscribe: Vec<LitStr>,
    publishes: Vec<LitStr>,
    outbound: Vec<LitStr>,
    name: Option<LitStr>,
    version: Option<LitStr>,
    queue_group: Option<LitStr>,
    order_by_header: Option<LitStr>,
    order_by_token: Option<syn::LitInt>,
    durable: bool,
    deliver_all: bool,
    seen_subscribe: bool,
}

impl Options {
    fn parse(&mut self, meta: syn::meta::ParseNestedMeta) -> syn::Result<()> {
        let key = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
        match key.as_str() {
            "subscribe" => {
                self.subscribe = string_list(&meta.value()?.parse::<Expr>()?)?;
                self.seen_subscribe = true;
            }
            "publishes" => self.publishes = string_list(&meta.value()?.parse::<Expr>()?)?,
            "outbound" => self.outbound = string_list(&meta.value()?.parse::<Expr>()?)?,
            "name" => self.name = Some(meta.value()?.parse()?),
            "version" => self.version = Some(meta.value()?.parse()?),
            "queue_group" => self.queue_group = Some(meta.value()?.parse()?),
            "order_by_header" => self.order_by_header = Some(meta.value()?.parse()?),
            "order_by_token" => self.order_by_token = Some(meta.value()?.parse()?),
            "durable" => self.durable = meta.value()?.parse::<syn::LitBool>()?.value,
            "deliver" => {
                let v: LitStr = meta.value()?.parse()?;
                self.deliver_all = match v.value().as_str() {
                    "all" => true,
                    "new" => false,
                    _ => {
                        return Err(syn::Error::new(v.span(), "deliver must be \"all\" or \"new\""));
                    }
                };
            }
            _ => {
                return Err(meta.error(
                    "unknown option; expected subscribe, publishes, outbound, name, version, queue_group, \
                     order_by_header, order_by_token, durable or deliver",
                ));
            }
        }
        Ok(())
    }
}

fn string_list(expr: &Expr) -> syn::Result<Vec<LitStr>> {
    let Expr::Array(ExprArray { elems, .. }) = expr else {
        return Err(syn::Error::new_spanned(expr, "expected a list of strings: [\"a.b\", \"c.>\"]"));
    };
    elems
        .iter()
        .map(|e| match e {
            Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.clone()),
            other => Err(syn::Error::new_spanned(other, "expected a string literal")),
        })
        .collect()
}

fn expand(opts: Options, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    if !opts.seen_subscribe || opts.subscribe.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            "#[handler] needs at least one subscription: subscribe = [\"orders.created\"]",
        ));
    }
    if opts.order_by_header.is_some() && opts.order_by_token.is_some() {
        return Err(syn::Error::new(Span::call_site(), "choose one of order_by_header and order_by_token"));
    }
    let mut func = func;
    let fn_name = func.sig.ident.clone();
    let name = match &opts.name {
        Some(n) => quote!(#n),
        None => quote!(env!("CARGO_PKG_NAME")),
    };
    let version = match &opts.version {
        Some(v) => quote!(#v),
        None => quote!(env!("CARGO_PKG_VERSION")),
    };
    let queue_group = match &opts.queue_group {
        Some(q) => quote!(Some(#q.to_string())),
        None => quote!(None),
    };
    let order_by = match (&opts.order_by_header, &opts.order_by_token) {
        (Some(h), _) => quote!(Some(__p::OrderKey::Header(#h.to_string()))),
        (_, Some(t)) => quote!(Some(__p::OrderKey::SubjectToken(#t))),
        _ => quote!(None),
    };
    let durable = opts.durable;
    let deliver = if opts.deliver_all { quote!(__p::DeliverPolicy::All) } else { quote!(__p::DeliverPolicy::New) };
    let declared_queue_group = match &opts.queue_group {
        Some(q) => quote!(Some(#q)),
        None => quote!(None),
    };
    let declared_order_by_header = match &opts.order_by_header {
        Some(h) => quote!(Some(#h)),
        None => quote!(None),
    };
    let subscribe = &opts.subscribe;
    let publishes = &opts.publishes;
    let outbound = &opts.outbound;

    // Natively (`cargo test`), the function first tells the SDK's test host who it is, so a
    // `TestHost::run` applies the same allow-list and subscriptions as the real host. The
    // function keeps its name and signature; on wasm32 the statement is not there at all.
    let declare: syn::Stmt = syn::parse_quote! {
        #[cfg(not(target_arch = "wasm32"))]
        ::plugbus_sdk::__private::declare(::plugbus_sdk::__private::Declared {
            name: #name,
            version: #version,
            subscribe: &[#(#subscribe),*],
            publishes: &[#(#publishes),*],
            outbound: &[#(#outbound),*],
            queue_group: #declared_queue_group,
            order_by_header: #declared_order_by_header,
        });
    };
    func.block.stmts.insert(0, declare);

    Ok(quote! {
        #func

        // Natively the function is used by tests only; this keeps a plain `cargo build` free
        // of dead-code warnings and checks the signature on every target.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(::plugbus_sdk::Event) -> ::core::result::Result<(), ::plugbus_sdk::HandlerError> = #fn_name;

        // The component glue exists only in the component: natively there is nothing to export
        // (and several handlers may live in one test binary).
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use ::plugbus_sdk::__private as __p;

            // The contract and SDK versions this component was built with, read by the host
            // at load (it refuses a contract it does not speak, naming both versions).
            #[unsafe(link_section = "plugbus-contract")]
            #[used]
            static __PLUGBUS_CONTRACT: [u8; __p::CONTRACT_SECTION.len()] = __p::CONTRACT_SECTION;

            struct Plugin;

            impl __p::Guest for Plugin {
                fn manifest() -> __p::Manifest {
                    __p::Manifest {
                        name: #name.to_string(),
                        version: #version.to_string(),
                        subscriptions: [#(#subscribe),*]
                            .iter()
                            .map(|pattern| __p::Subscription {
                                pattern: pattern.to_string(),
                                queue_group: #queue_group,
                                order_by: #order_by,
                                durable: #durable,
                                deliver: #deliver,
                            })
                            .collect(),
                        publishes: [#(#publishes),*].iter().map(|p: &&str| p.to_string()).collect(),
                    }
                }

                fn handle(event: __p::WitEvent) -> Result<(), __p::WitHandlerError> {
                    __p::run(event, #fn_name)
                }
            }

            impl __p::OutboundGuest for Plugin {
                fn requested() -> ::std::vec::Vec<::std::string::String> {
                    [#(#outbound),*].iter().map(|o: &&str| o.to_string()).collect()
                }
            }

            ::plugbus_sdk::__bindings::__export_plugin!(Plugin);
        };
    })
}
