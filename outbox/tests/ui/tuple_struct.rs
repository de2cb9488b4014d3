#[outbox::publish(destination = "/topic/orders")]
pub struct Model(pub i32);

fn main() {}
