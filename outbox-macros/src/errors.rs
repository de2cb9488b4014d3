//! The errors of one expansion, collected so the user sees every mistake in one build.
//!
//! Each stage reports into an [`Errors`] and carries on with what it could understand, in the way
//! of serde_derive's `Ctxt`; the expansion turns the list into `compile_error!` invocations at the
//! end. Nothing here panics: a list that is never read is simply dropped.

use proc_macro2::TokenStream;
use quote::ToTokens;
use std::fmt::Display;

/// The compile errors found so far, in the order they were found.
#[derive(Default)]
pub struct Errors {
    list: Vec<syn::Error>,
}

impl Errors {
    pub fn new() -> Self {
        Self::default()
    }

    /// An error covering the tokens of `at` (the whole attribute, a literal, an identifier...).
    pub fn spanned<T: ToTokens, M: Display>(&mut self, at: T, message: M) {
        self.list.push(syn::Error::new_spanned(at, message));
    }

    /// An error of the parser, which already knows where it stopped.
    pub fn push(&mut self, error: syn::Error) {
        self.list.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many errors so far: a check compares it before and after to know whether it failed.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Moves the errors of `other` after these.
    pub fn append(&mut self, other: &mut Errors) {
        self.list.append(&mut other.list);
    }

    /// One `compile_error!` per error, each at its own span.
    pub fn to_compile_errors(&self) -> TokenStream {
        self.list.iter().map(syn::Error::to_compile_error).collect()
    }
}
