//! What a connection is, as far as atomicity goes: a transaction, or a pool connection on which
//! every statement commits on its own.

use std::any::type_name;

/// What a connection type is, as far as atomicity goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectionKind {
    /// A transaction: statements on it commit together.
    Transaction,
    /// A pool connection: every statement commits on its own.
    Autocommit,
    /// A connection type this library does not know.
    Unknown,
}

/// Classifies a connection type by its name: `ConnectionTrait` cannot tell whether it is a
/// transaction, and hooks cannot require `'static` (for `TypeId`). The names are checked by tests.
pub(crate) fn connection_kind<C: ?Sized>() -> ConnectionKind {
    let name = type_name::<C>();
    let base = name.split('<').next().unwrap_or(name);
    match base.rsplit("::").next().unwrap_or(base) {
        "DatabaseTransaction" | "RestrictedTransaction" => ConnectionKind::Transaction,
        "DatabaseConnection" | "RestrictedConnection" => ConnectionKind::Autocommit,
        _ => ConnectionKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_types_are_classified_by_name() {
        assert_eq!(
            connection_kind::<sea_orm::DatabaseTransaction>(),
            ConnectionKind::Transaction
        );
        assert_eq!(
            connection_kind::<sea_orm::DatabaseConnection>(),
            ConnectionKind::Autocommit
        );
        assert_eq!(
            connection_kind::<sea_orm::DatabaseExecutor<'static>>(),
            ConnectionKind::Unknown
        );
    }
}
