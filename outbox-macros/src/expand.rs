//! Code generation: the `Publish` impl and, unless `manual`, the `ActiveModelBehavior` impl that
//! calls `outbox::write::hooks`. Everything is named by absolute path, so the code compiles in any module
//! whatever the user imported; type errors are steered onto the user's tokens with
//! `quote_spanned!`, where the runtime's `#[diagnostic::on_unimplemented]` traits explain them.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};
use syn::{Attribute, Item, ItemStruct};

use crate::ast::Model;
use crate::attr::{self, Route};
use crate::errors::Errors;
use crate::validate::{self, Body, Member, Publish, RouteKey};

/// The whole expansion of the first `#[publish]` attribute of an item.
pub fn publish(arguments: TokenStream, input: TokenStream) -> TokenStream {
    let mut item: Item = match syn::parse2(input.clone()) {
        Ok(item) => item,
        // rustc has parsed the item already; this is unreachable in practice.
        Err(error) => {
            let error = error.to_compile_error();
            return quote!(#input #error);
        }
    };
    let first = attr::parse_arguments(arguments);

    let Item::Struct(item) = &mut item else {
        // The item's other `#[publish]` attributes would only repeat this error.
        take_publish_attrs(item_attrs(&mut item));
        let error = syn::Error::new_spanned(
            item_name(&item),
            "#[publish] goes on the `Model` struct of a SeaORM entity",
        )
        .to_compile_error();
        return quote!(#item #error);
    };
    let following = take_publish_attrs(Some(&mut item.attrs));
    // Below `#[sea_orm::model]`, SeaORM copies our attributes onto the `ModelEx` it generates.
    // `Model` carries the same attributes and generates everything; `ModelEx` stays as it came.
    if item.ident == "ModelEx" {
        return quote!(#item);
    }

    let mut routes = vec![first];
    routes.extend(following.iter().map(attr::parse_attribute));
    let mut struct_errors = Errors::new();
    let model = Model::from_struct(item, &mut struct_errors);
    let publish = model
        .as_ref()
        .and_then(|model| validate::check(model, &mut routes, &mut struct_errors));

    if let Some(publish) = publish {
        let publish_impl = publish_impl(&publish);
        let behavior = if publish.manual {
            TokenStream::new()
        } else {
            behavior_impl(&publish)
        };
        return quote! {
            #item
            #publish_impl
            #behavior
        };
    }

    // In attribute order, then the struct's own: the order they are written in.
    let mut errors = Errors::new();
    for route in &mut routes {
        errors.append(&mut route.errors);
    }
    errors.append(&mut struct_errors);
    let errors = errors.to_compile_errors();
    // The struct and an empty `ActiveModelBehavior` keep the user's view to our errors, without
    // "ActiveModelBehavior is not implemented" and the like after them.
    let placeholder = if model.is_some()
        && item.ident == "Model"
        && !is_manual(&routes)
        && is_sea_orm_entity(item)
    {
        quote! {
            #[automatically_derived]
            impl ::outbox::__private::sea_orm::ActiveModelBehavior for ActiveModel {}
        }
    } else {
        TokenStream::new()
    };
    quote! {
        #item
        #placeholder
        #errors
    }
}

fn is_manual(routes: &[Route]) -> bool {
    routes.first().is_some_and(|route| route.manual.is_some())
}

/// Whether SeaORM generates an `ActiveModel` next to this struct, as far as its attributes tell:
/// a `#[sea_orm(..)]` attribute (legal only under SeaORM's derives), `#[sea_orm::model]`, or a
/// derive of `DeriveEntityModel` or `DeriveActiveModel`. Below `#[derive(..)]` the derive is no
/// longer among the attributes we see, but its `#[sea_orm(..)]` helpers are.
fn is_sea_orm_entity(item: &ItemStruct) -> bool {
    let field_attrs = item.fields.iter().flat_map(|field| &field.attrs);
    item.attrs.iter().chain(field_attrs).any(|attr| {
        let path = attr.path();
        let sea_orm = path
            .segments
            .first()
            .is_some_and(|segment| segment.ident == "sea_orm");
        let derives_entity = path.is_ident("derive")
            && attr.meta.require_list().is_ok_and(|list| {
                list.tokens.clone().into_iter().any(|token| {
                    matches!(&token, TokenTree::Ident(ident)
                        if ident == "DeriveEntityModel" || ident == "DeriveActiveModel")
                })
            });
        sea_orm || derives_entity
    })
}

/// Removes the item's other `#[publish]` attributes: this expansion handles them all.
fn take_publish_attrs(attrs: Option<&mut Vec<Attribute>>) -> Vec<Attribute> {
    let Some(attrs) = attrs else {
        return Vec::new();
    };
    let (ours, others) = std::mem::take(attrs)
        .into_iter()
        .partition(attr::is_publish);
    *attrs = others;
    ours
}

fn item_attrs(item: &mut Item) -> Option<&mut Vec<Attribute>> {
    match item {
        Item::Const(item) => Some(&mut item.attrs),
        Item::Enum(item) => Some(&mut item.attrs),
        Item::Fn(item) => Some(&mut item.attrs),
        Item::Impl(item) => Some(&mut item.attrs),
        Item::Mod(item) => Some(&mut item.attrs),
        Item::Static(item) => Some(&mut item.attrs),
        Item::Struct(item) => Some(&mut item.attrs),
        Item::Trait(item) => Some(&mut item.attrs),
        Item::Type(item) => Some(&mut item.attrs),
        Item::Union(item) => Some(&mut item.attrs),
        Item::Use(item) => Some(&mut item.attrs),
        _ => None,
    }
}

/// What an error about the item as a whole points at: its keyword and name where it has them.
fn item_name(item: &Item) -> TokenStream {
    match item {
        Item::Enum(item) => {
            let (keyword, name) = (&item.enum_token, &item.ident);
            quote!(#keyword #name)
        }
        Item::Union(item) => {
            let (keyword, name) = (&item.union_token, &item.ident);
            quote!(#keyword #name)
        }
        Item::Fn(item) => {
            let (keyword, name) = (&item.sig.fn_token, &item.sig.ident);
            quote!(#keyword #name)
        }
        Item::Type(item) => {
            let (keyword, name) = (&item.type_token, &item.ident);
            quote!(#keyword #name)
        }
        Item::Trait(item) => {
            let (keyword, name) = (&item.trait_token, &item.ident);
            quote!(#keyword #name)
        }
        _ => quote_spanned!(Span::call_site()=> publish),
    }
}

fn publish_impl(publish: &Publish) -> TokenStream {
    let model = &publish.model;
    let allow_autocommit = publish.allow_autocommit;
    let routes = publish.routes.iter().map(|route| {
        let destination = &route.destination;
        let version = match &route.version {
            Some(version) => quote!(::core::option::Option::Some(#version)),
            None => quote!(::core::option::Option::None),
        };
        let on = events(route);
        quote! {
            ::outbox::write::Route { destination: #destination, version: #version, on: #on }
        }
    });
    let bodies = publish.routes.iter().enumerate().map(|(index, route)| {
        let body = match &route.body {
            Body::Object(members) => object_body(&publish.primary_key, members),
            Body::Serializer(path) => quote_spanned! {path_span(path)=>
                ::outbox::__private::serializer_body(#path(self))
            },
        };
        quote!(#index => #body,)
    });
    let deleted_key = if publish.routes.iter().any(|route| route.delete) {
        deleted_key(&publish.primary_key)
    } else {
        TokenStream::new()
    };
    let keys = ordering_keys(publish);
    quote! {
        #[automatically_derived]
        impl ::outbox::write::Publish for #model {
            const ENTITY: &'static str = ::core::module_path!();
            const ROUTES: &'static [::outbox::write::Route] = &[#(#routes),*];
            const ALLOW_AUTOCOMMIT: bool = #allow_autocommit;

            fn body(
                &self,
                route: usize,
            ) -> ::core::result::Result<
                ::outbox::__private::serde_json::Value,
                ::outbox::__private::serde_json::Error,
            > {
                match route {
                    #(#bodies)*
                    _ => ::core::result::Result::Ok(::outbox::__private::serde_json::Value::Null),
                }
            }

            #deleted_key
            #keys
        }
    }
}

/// `Publish::key` and, for routes that publish deletes, `Publish::deleted_message_key`, when any
/// route has a key. Each key is read by a call spanned at the user's tokens, where a type that
/// does not print is reported (through `PublishKey`).
fn ordering_keys(publish: &Publish) -> TokenStream {
    if publish.routes.iter().all(|route| route.key.is_none()) {
        return TokenStream::new();
    }
    let keys = publish
        .routes
        .iter()
        .enumerate()
        .filter_map(|(index, route)| {
            let read = match route.key.as_ref()? {
                RouteKey::Field(member) => {
                    let field = &member.field;
                    quote_spanned! {member.span=>
                        ::outbox::__private::PublishKey::to_key(&self.#field)
                    }
                }
                RouteKey::Function(path) => quote_spanned! {path_span(path)=>
                    ::outbox::__private::key_of(#path(self))
                },
            };
            Some(quote!(#index => ::core::option::Option::Some(#read),))
        });
    let deleted = publish
        .routes
        .iter()
        .enumerate()
        .filter_map(|(index, route)| match &route.key {
            Some(RouteKey::Field(member)) if route.delete => {
                let field = &member.field;
                Some(quote_spanned! {member.span=>
                    #index => ::outbox::__private::active_key_string(&active.#field),
                })
            }
            _ => None,
        })
        .collect::<Vec<_>>();
    let deleted = if deleted.is_empty() {
        TokenStream::new()
    } else {
        quote! {
            fn deleted_message_key(
                active: &::outbox::write::ActiveModelOf<Self>,
                route: usize,
            ) -> ::core::option::Option<::std::string::String> {
                match route {
                    #(#deleted)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    };
    quote! {
        fn key(&self, route: usize) -> ::core::option::Option<::std::string::String> {
            match route {
                #(#keys)*
                _ => ::core::option::Option::None,
            }
        }

        #deleted
    }
}

/// The serializer's location with the macro's hygiene: errors about the function point at it.
fn path_span(path: &syn::ExprPath) -> Span {
    Span::call_site().located_at(syn::spanned::Spanned::span(path))
}

fn events(route: &validate::Route) -> TokenStream {
    let mut sets = Vec::new();
    match (route.insert, route.update) {
        (true, true) => sets.push(quote!(SAVE)),
        (true, false) => sets.push(quote!(INSERT)),
        (false, true) => sets.push(quote!(UPDATE)),
        (false, false) => {}
    }
    if route.delete {
        sets.push(quote!(DELETE));
    }
    let mut sets = sets.into_iter();
    let Some(first) = sets.next() else {
        // `validate` refuses an empty `on()`; an empty set would publish nothing.
        return quote!(::outbox::write::Events::SAVE);
    };
    quote!(::outbox::write::Events::#first #(.with(::outbox::write::Events::#sets))*)
}

/// `{"id": key, "field": value, ...}`. Each field is added by its own call spanned at the user's
/// tokens, where a field type that is not `Serialize` is reported (through `PublishField`).
fn object_body(primary_key: &[Member], members: &[Member]) -> TokenStream {
    let add_key = match primary_key {
        [single] => add_field("id", single),
        several => {
            // `[a, b]`, each part checked at its own field.
            let parts = several.iter().map(|member| {
                let field = &member.field;
                quote_spanned! {member.span=>
                    ::outbox::__private::PublishField::to_json(&self.#field)?
                }
            });
            quote! {
                let body = ::outbox::__private::ObjectBuilder::field(
                    body,
                    "id",
                    &::outbox::__private::serde_json::Value::Array(::std::vec![#(#parts),*]),
                )?;
            }
        }
    };
    let add_fields = members.iter().map(|member| add_field(&member.key, member));
    quote! {{
        let body = ::outbox::__private::ObjectBuilder::new();
        #add_key
        #(#add_fields)*
        ::core::result::Result::Ok(body.finish())
    }}
}

fn add_field(key: &str, member: &Member) -> TokenStream {
    let field = &member.field;
    quote_spanned! {member.span=>
        let body = ::outbox::__private::ObjectBuilder::field(body, #key, &self.#field)?;
    }
}

/// The key of a deleted row, read from the active model's key columns.
fn deleted_key(primary_key: &[Member]) -> TokenStream {
    let columns = primary_key.iter().map(|member| {
        let field = &member.field;
        quote_spanned!(member.span=> ::outbox::__private::active_value(&active.#field)?)
    });
    quote! {
        fn deleted_key(
            active: &::outbox::write::ActiveModelOf<Self>,
        ) -> ::core::result::Result<
            ::core::option::Option<::outbox::__private::serde_json::Value>,
            ::outbox::__private::serde_json::Error,
        > {
            ::core::result::Result::Ok(::outbox::__private::active_key(::std::vec![#(#columns),*]))
        }
    }
}

/// `ActiveModelBehavior` with every save (and, with a delete route, every delete) going through
/// `outbox::write::hooks`.
fn behavior_impl(publish: &Publish) -> TokenStream {
    let model = &publish.model;
    let delete_hooks = if publish.routes.iter().any(|route| route.delete) {
        quote! {
            async fn before_delete<C>(
                self,
                db: &C,
            ) -> ::core::result::Result<Self, ::outbox::__private::sea_orm::DbErr>
            where
                C: ::outbox::__private::sea_orm::ConnectionTrait,
            {
                // Publishes here, only if the row exists: SeaORM's `after_delete` runs whether
                // or not the delete removed anything.
                ::outbox::write::hooks::before_delete_existing::<#model, C>(&self, db).await?;
                ::core::result::Result::Ok(self)
            }
        }
    } else {
        TokenStream::new()
    };
    quote! {
        #[automatically_derived]
        #[::outbox::__private::async_trait::async_trait]
        impl ::outbox::__private::sea_orm::ActiveModelBehavior for ActiveModel {
            async fn before_save<C>(
                self,
                db: &C,
                insert: bool,
            ) -> ::core::result::Result<Self, ::outbox::__private::sea_orm::DbErr>
            where
                C: ::outbox::__private::sea_orm::ConnectionTrait,
            {
                ::outbox::write::hooks::before_save::<#model, C>(db, insert)?;
                ::core::result::Result::Ok(self)
            }

            async fn after_save<C>(
                model: #model,
                db: &C,
                insert: bool,
            ) -> ::core::result::Result<#model, ::outbox::__private::sea_orm::DbErr>
            where
                C: ::outbox::__private::sea_orm::ConnectionTrait,
            {
                ::outbox::write::hooks::after_save::<#model, C>(&model, db, insert).await?;
                ::core::result::Result::Ok(model)
            }

            #delete_hooks
        }
    }
}
