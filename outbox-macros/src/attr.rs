//! The arguments of `#[publish(...)]`, parsed into a [`Route`] without judging them.
//!
//! This stage reports what is wrong with the syntax of one argument (an unknown or repeated name,
//! a value of the wrong kind, an unknown event) and keeps going, so one build shows every mistake.
//! Whether the arguments make sense together, and against the struct, is `validate`'s job.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Attribute, Expr, ExprLit, ExprPath, Ident, Lit, LitStr, Meta, Token};

use crate::errors::Errors;

/// The arguments of one `#[publish(...)]` attribute.
pub struct Route {
    /// The attribute itself, where errors about what it lacks are reported.
    pub at: TokenStream,
    /// The mistakes found in this attribute, by this stage and by `validate`; reported per
    /// attribute, in attribute order.
    pub errors: Errors,
    /// Not written as a list (`#[publish = ".."]`): reported, and not checked any further.
    pub malformed: bool,
    /// The names of the arguments written, once each, whatever their values.
    pub keys: Vec<String>,
    pub destination: Option<LitStr>,
    pub version: Option<LitStr>,
    pub fields: Option<FieldList>,
    pub serializer: Option<Serializer>,
    pub on: Option<EventList>,
    pub key: Option<KeyValue>,
    pub allow_autocommit: Option<Ident>,
    pub manual: Option<Ident>,
}

/// `key = field` or `key = path::to_fn`: what a message's ordering key is read from.
pub enum KeyValue {
    /// A single identifier: a field of the model.
    Field(Ident),
    /// A path of several segments: a function `fn(&Model) -> impl ToString`.
    Function(ExprPath),
}

/// `fields(a, b)`.
pub struct FieldList {
    pub keyword: Ident,
    pub names: Vec<Ident>,
}

/// `serializer = path::to_fn`.
pub struct Serializer {
    pub keyword: Ident,
    pub path: ExprPath,
}

/// `on(insert, update, delete)`.
pub struct EventList {
    pub keyword: Ident,
    pub events: Vec<(Event, Ident)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Insert,
    Update,
    Delete,
}

impl Route {
    fn new(at: TokenStream) -> Self {
        Route {
            at,
            errors: Errors::new(),
            malformed: false,
            keys: Vec::new(),
            destination: None,
            version: None,
            fields: None,
            serializer: None,
            on: None,
            key: None,
            allow_autocommit: None,
            manual: None,
        }
    }

    /// Whether the argument `name` was written at all, even with a wrong value.
    pub fn has_key(&self, name: &str) -> bool {
        self.keys.iter().any(|key| key == name)
    }
}

impl ToTokens for Serializer {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        let Serializer { keyword, path } = self;
        tokens.extend(quote!(#keyword = #path));
    }
}

/// The arguments of the attribute being expanded; rustc gives us only its arguments, and its
/// call-site span is the attribute.
pub fn parse_arguments(arguments: TokenStream) -> Route {
    let mut route = Route::new(quote_spanned!(Span::call_site()=> publish));
    parse_into(&mut route, arguments);
    route
}

/// Whether `attr` is one of ours (`#[publish]`, `#[outbox::publish]`, ...), by the last segment
/// of its path, since the user may import or rename the crate as they like.
pub fn is_publish(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|segment| segment.ident == "publish")
}

/// The arguments of a following `#[publish(...)]` attribute.
pub fn parse_attribute(attr: &Attribute) -> Route {
    let mut route = Route::new(attr.to_token_stream());
    match &attr.meta {
        Meta::List(list) => parse_into(&mut route, list.tokens.clone()),
        // Reported by `validate` as a missing destination, at the attribute.
        Meta::Path(_) => {}
        Meta::NameValue(_) => {
            route
                .errors
                .spanned(attr, "expected `#[publish(destination = \"...\", ...)]`");
            route.malformed = true;
        }
    }
    route
}

fn parse_into(route: &mut Route, arguments: TokenStream) {
    let mut errors = Errors::new();
    let parser = |input: ParseStream| parse_argument_list(input, route, &mut errors);
    if let Err(error) = parser.parse2(arguments) {
        errors.push(error);
    }
    route.errors = errors;
}

/// The value written after an argument's name.
enum Value {
    /// `name`
    Flag,
    /// `name = expr`
    Assign(Expr),
    /// `name(...)`: the parenthesised tokens, parsed by the argument that takes them.
    List(TokenStream),
}

fn parse_argument_list(
    input: ParseStream,
    route: &mut Route,
    errors: &mut Errors,
) -> syn::Result<()> {
    while !input.is_empty() {
        let key = input.call(Ident::parse_any)?;
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Value::Assign(input.parse()?)
        } else if input.peek(syn::token::Paren) {
            let content;
            syn::parenthesized!(content in input);
            Value::List(content.parse()?)
        } else {
            Value::Flag
        };
        set_argument(route, key, value, errors);
        if input.is_empty() {
            break;
        }
        input.parse::<Token![,]>()?;
    }
    Ok(())
}

const ARGUMENTS: [&str; 8] = [
    "destination",
    "version",
    "fields",
    "serializer",
    "on",
    "key",
    "allow_autocommit",
    "manual",
];

fn set_argument(route: &mut Route, key: Ident, value: Value, errors: &mut Errors) {
    let name = key.unraw().to_string();
    if !ARGUMENTS.contains(&name.as_str()) {
        let expected = ARGUMENTS.map(|argument| format!("`{argument}`")).join(", ");
        errors.spanned(
            &key,
            format!("unknown argument `{name}`; expected one of {expected}"),
        );
        return;
    }
    if route.has_key(&name) {
        errors.spanned(&key, format!("duplicate `{name}` argument"));
        return;
    }
    route.keys.push(name.clone());
    match name.as_str() {
        "destination" => route.destination = string(&key, value, "/topic/orders", errors),
        "version" => route.version = string(&key, value, "v1", errors),
        "fields" => route.fields = field_list(key, value, errors),
        "serializer" => route.serializer = serializer(key, value, errors),
        "on" => route.on = event_list(key, value, errors),
        "key" => route.key = ordering_key(key, value, errors),
        "allow_autocommit" => route.allow_autocommit = flag(key, value, errors),
        "manual" => route.manual = flag(key, value, errors),
        // Unknown names were reported above.
        _ => {}
    }
}

fn string(key: &Ident, value: Value, example: &str, errors: &mut Errors) -> Option<LitStr> {
    match value {
        Value::Assign(Expr::Lit(ExprLit {
            lit: Lit::Str(literal),
            ..
        })) => Some(literal),
        Value::Assign(other) => {
            errors.spanned(
                other,
                format!("expected a string literal: `{key} = \"{example}\"`"),
            );
            None
        }
        Value::Flag | Value::List(_) => {
            errors.spanned(key, format!("expected `{key} = \"{example}\"`"));
            None
        }
    }
}

fn field_list(keyword: Ident, value: Value, errors: &mut Errors) -> Option<FieldList> {
    let Value::List(tokens) = value else {
        errors.spanned(&keyword, "expected a list of fields: `fields(a, b)`");
        return None;
    };
    match Punctuated::<Ident, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(names) => Some(FieldList {
            keyword,
            names: names.into_iter().collect(),
        }),
        Err(error) => {
            errors.push(error);
            None
        }
    }
}

fn serializer(keyword: Ident, value: Value, errors: &mut Errors) -> Option<Serializer> {
    match value {
        Value::Assign(Expr::Path(path)) => Some(Serializer { keyword, path }),
        Value::Assign(other) => {
            errors.spanned(
                other,
                "expected the path of a function: `serializer = crate::bodies::order`",
            );
            None
        }
        Value::Flag | Value::List(_) => {
            errors.spanned(
                &keyword,
                "expected `serializer = path::to_function`, a `fn(&Model) -> impl Serialize`",
            );
            None
        }
    }
}

fn ordering_key(keyword: Ident, value: Value, errors: &mut Errors) -> Option<KeyValue> {
    match value {
        Value::Assign(Expr::Path(path)) if path.qself.is_none() && path.attrs.is_empty() => {
            Some(match path.path.get_ident() {
                Some(field) => KeyValue::Field(field.clone()),
                None => KeyValue::Function(path),
            })
        }
        Value::Assign(other) => {
            errors.spanned(
                other,
                "expected a field or the path of a function: `key = customer_id` or \
                 `key = crate::keys::order`",
            );
            None
        }
        Value::Flag | Value::List(_) => {
            errors.spanned(
                &keyword,
                "expected `key = field`, or `key = path::to_function`, a \
                 `fn(&Model) -> impl ToString`",
            );
            None
        }
    }
}

fn event_list(keyword: Ident, value: Value, errors: &mut Errors) -> Option<EventList> {
    let Value::List(tokens) = value else {
        errors.spanned(
            &keyword,
            "expected a list of events: `on(insert, update, delete)`",
        );
        return None;
    };
    let names = match Punctuated::<Ident, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(names) => names,
        Err(error) => {
            errors.push(error);
            return None;
        }
    };
    let written = names.len();
    let mut events: Vec<(Event, Ident)> = Vec::new();
    for name in names {
        let event = if name == "insert" {
            Event::Insert
        } else if name == "update" {
            Event::Update
        } else if name == "delete" {
            Event::Delete
        } else {
            errors.spanned(
                &name,
                format!("unknown event `{name}`; expected `insert`, `update` or `delete`"),
            );
            continue;
        };
        if events.iter().any(|(seen, _)| *seen == event) {
            errors.spanned(&name, format!("duplicate event `{name}`"));
            continue;
        }
        events.push((event, name));
    }
    // An empty list is `validate`'s to report; a list of only unknown events was reported above.
    if events.is_empty() && written > 0 {
        return None;
    }
    Some(EventList { keyword, events })
}

fn flag(key: Ident, value: Value, errors: &mut Errors) -> Option<Ident> {
    match value {
        Value::Flag => Some(key),
        Value::Assign(_) | Value::List(_) => {
            errors.spanned(&key, format!("`{key}` is a flag and takes no value"));
            None
        }
    }
}
