//! The struct under the attribute, reduced to what publishing needs: its name, its columns and
//! which of them form the primary key.
//!
//! The struct is read as SeaORM reads it: `#[sea_orm(primary_key)]` marks a key column (alone or
//! with other options), `#[sea_orm(ignore)]` a field that is not a column, and a field typed
//! `HasOne<..>`, `HasMany<..>` or `BelongsTo<..>` a relation that `#[sea_orm::model]` moves out of
//! `Model` into `ModelEx`. Such fields are in our input only when the attribute is written above
//! `#[sea_orm::model]`; the generated code must never name them.

use proc_macro2::TokenTree;
use syn::{Attribute, Field, Fields, Ident, ItemStruct, MacroDelimiter, Meta, Type};

use crate::errors::Errors;

/// A struct with named fields.
pub struct Model {
    pub ident: Ident,
    /// Every field that stays in the final `Model`, in declaration order.
    pub columns: Vec<Column>,
    /// Fields that are relations, not columns (see the module docs).
    pub relations: Vec<Ident>,
}

/// A field of the final `Model`.
pub struct Column {
    pub ident: Ident,
    pub ty: Type,
    /// `#[sea_orm(primary_key)]`.
    pub primary_key: bool,
    /// `#[sea_orm(ignore)]`: a field of the struct that is no column of the table.
    pub ignored: bool,
}

impl Model {
    /// Reads a struct; `None` (with an error) when it has no named fields.
    pub fn from_struct(item: &ItemStruct, errors: &mut Errors) -> Option<Self> {
        let Fields::Named(named) = &item.fields else {
            errors.spanned(
                &item.ident,
                "#[publish] goes on a struct with named fields: the `Model` of a SeaORM entity",
            );
            return None;
        };
        let mut columns = Vec::new();
        let mut relations = Vec::new();
        for field in &named.named {
            let Some(ident) = field.ident.clone() else {
                continue;
            };
            if is_relation(&field.ty) {
                relations.push(ident);
                continue;
            }
            let options = SeaOrmOptions::of(field);
            columns.push(Column {
                ident,
                ty: field.ty.clone(),
                primary_key: options.primary_key,
                ignored: options.ignore,
            });
        }
        Some(Model {
            ident: item.ident.clone(),
            columns,
            relations,
        })
    }

    pub fn column(&self, name: &Ident) -> Option<&Column> {
        self.columns.iter().find(|column| column.ident == *name)
    }

    /// The key columns, in declaration order.
    pub fn primary_key(&self) -> Vec<&Column> {
        self.columns
            .iter()
            .filter(|column| column.primary_key)
            .collect()
    }
}

/// Whether `ty` is one of the relation wrappers that `#[sea_orm::model]` moves to `ModelEx`; it
/// recognises them by the last segment of the type's path, as SeaORM does.
fn is_relation(ty: &Type) -> bool {
    let Type::Path(path) = ty else {
        return false;
    };
    path.path.segments.last().is_some_and(|segment| {
        segment.ident == "HasOne" || segment.ident == "HasMany" || segment.ident == "BelongsTo"
    })
}

/// The flags of a field's `#[sea_orm(...)]` attributes that matter here.
#[derive(Default)]
struct SeaOrmOptions {
    primary_key: bool,
    ignore: bool,
}

impl SeaOrmOptions {
    fn of(field: &Field) -> Self {
        let mut options = SeaOrmOptions::default();
        for attr in &field.attrs {
            for flag in sea_orm_flags(attr) {
                if flag == "primary_key" {
                    options.primary_key = true;
                } else if flag == "ignore" {
                    options.ignore = true;
                }
            }
        }
        options
    }
}

/// The bare identifiers among the comma-separated options of a `#[sea_orm(...)]` attribute
/// (`primary_key` in `#[sea_orm(primary_key, auto_increment = false)]`). The options are scanned
/// as tokens, not parsed: SeaORM owns their syntax and reports its own errors.
fn sea_orm_flags(attr: &Attribute) -> Vec<Ident> {
    let Meta::List(list) = &attr.meta else {
        return Vec::new();
    };
    if !list.path.is_ident("sea_orm") || !matches!(list.delimiter, MacroDelimiter::Paren(_)) {
        return Vec::new();
    }
    let mut flags = Vec::new();
    let mut option: Vec<TokenTree> = Vec::new();
    for token in list.tokens.clone() {
        if matches!(&token, TokenTree::Punct(p) if p.as_char() == ',') {
            flags.extend(bare_ident(&option));
            option.clear();
        } else {
            option.push(token);
        }
    }
    flags.extend(bare_ident(&option));
    flags
}

/// The identifier an option consists of, if it is nothing else (`primary_key`, not `column_name = ".."`).
fn bare_ident(option: &[TokenTree]) -> Option<Ident> {
    match option {
        [TokenTree::Ident(ident)] => Some(ident.clone()),
        _ => None,
    }
}
