// With `DeriveEntityModel`, SeaORM reports a missing primary key too (with errors of its own
// after it); without it, the message is ours alone.
#[outbox::publish(destination = "/topic/orders")]
pub struct Model {
    pub id: i32,
    pub total: i64,
}

fn main() {}
