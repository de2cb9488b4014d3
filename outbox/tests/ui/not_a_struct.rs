#[outbox::publish(destination = "/topic/orders")]
pub enum Model {
    Draft,
    Paid,
}

fn main() {}
