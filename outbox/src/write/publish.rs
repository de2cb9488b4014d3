//! What `#[publish]` generates: an implementation of [`Publish`] that tells the write path where a
//! model is published and what each message's body is.
//!
//! The attribute is the normal way to implement this trait; a hand-written implementation is
//! possible (for a model whose routes are not known to a macro) and behaves the same.

use sea_orm::{EntityTrait, ModelTrait};

/// The kind of write that triggers publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A new row (`ActiveModel::insert`, or `save` of a model without a primary key).
    Insert,
    /// A changed row (`ActiveModel::update`, or `save` of a model with a primary key).
    Update,
    /// A deleted row (`ActiveModel::delete`); only published by routes that opt in.
    Delete,
}

impl Event {
    /// The event of a save: insert when `insert` is true, else update.
    pub fn of_save(insert: bool) -> Self {
        if insert { Event::Insert } else { Event::Update }
    }
}

/// A set of [`Event`]s a route publishes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Events(u8);

impl Events {
    /// Inserts only.
    pub const INSERT: Events = Events(1);
    /// Updates only.
    pub const UPDATE: Events = Events(2);
    /// Deletes only.
    pub const DELETE: Events = Events(4);
    /// Inserts and updates: the default, as every save publishes.
    pub const SAVE: Events = Events(1 | 2);

    /// The union of two sets.
    pub const fn with(self, other: Events) -> Events {
        Events(self.0 | other.0)
    }

    /// Whether `event` is in this set.
    pub const fn contains(self, event: Event) -> bool {
        let bit = match event {
            Event::Insert => 1,
            Event::Update => 2,
            Event::Delete => 4,
        };
        self.0 & bit != 0
    }
}

/// One `#[publish(...)]` attribute: where a model's messages go and on which events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The STOMP destination, without the version suffix (`/topic/orders`).
    pub destination: &'static str,
    /// The version (`v1`): stored in the row and appended to the destination (`/topic/orders.v1`).
    pub version: Option<&'static str>,
    /// The events this route publishes on.
    pub on: Events,
}

/// The model type of an entity, as seen from its `ActiveModel`.
pub type ActiveModelOf<M> = <<M as ModelTrait>::Entity as EntityTrait>::ActiveModel;

/// A SeaORM model whose saves write outbox rows. Implemented by `#[outbox::publish]`.
///
/// The write path ([`crate::write::hooks`]) calls [`Publish::body`] once per matching route and inserts
/// one outbox row per route, in route order, on the connection of the save.
pub trait Publish: ModelTrait + Send + Sync {
    /// The entity's name in errors and logs (the module path of its `Model`).
    const ENTITY: &'static str;
    /// One route per `#[publish]` attribute, in attribute order.
    const ROUTES: &'static [Route];
    /// Whether a save on an autocommit connection is allowed (`#[publish(.., allow_autocommit)]`).
    /// When false, such a save is refused before anything is written.
    const ALLOW_AUTOCOMMIT: bool = false;

    /// The JSON body of route number `route` (an index into [`Publish::ROUTES`]) for this model.
    fn body(&self, route: usize) -> Result<serde_json::Value, serde_json::Error>;

    /// The primary key of a deleted row, as a message body (`{"id": key}`) is built from it.
    /// `Ok(None)` when the active model does not hold its key.
    fn deleted_key(
        active: &ActiveModelOf<Self>,
    ) -> Result<Option<serde_json::Value>, serde_json::Error> {
        let _ = active;
        Ok(None)
    }

    /// The ordering key of route `route`'s message for this model (`#[publish(.., key = ..)]`),
    /// `None` for a route without one. See [`crate::write::Message::key`].
    fn key(&self, route: usize) -> Option<String> {
        let _ = route;
        None
    }

    /// The ordering key of route `route`'s message for a deleted row, read from the primary-key
    /// field of its active model that the route names as its key.
    fn deleted_message_key(active: &ActiveModelOf<Self>, route: usize) -> Option<String> {
        let _ = (active, route);
        None
    }
}
