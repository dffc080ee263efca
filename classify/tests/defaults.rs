//! The shipped rules, checked on the sentences they are meant for.

use botline_shared::config::Settings;
use botline_shared::message::{Chat, ChatKind, Origin, Priority, Sender, UnifiedMessage};
use classify::rules::IntentModel;
use classify::{keyword_model, Classifier, ClassifySettings};

fn message(text: &str, origin: Origin) -> UnifiedMessage {
    UnifiedMessage {
        id: "m".into(),
        platform: "web".into(),
        bot: "botline".into(),
        chat: Chat {
            id: "c".into(),
            kind: ChatKind::Direct,
        },
        thread: None,
        sender: Sender {
            id: "u".into(),
            name: "u".into(),
            is_bot: false,
        },
        text: text.into(),
        mentions: Default::default(),
        attachments: vec![],
        reply_to: None,
        platform_ts_ms: None,
        received_at_ms: 0,
        trace_id: "t".into(),
        origin,
        replay: false,
        raw: None,
    }
}

#[test]
fn shipped_rules_classify_english_and_chinese() {
    let settings: ClassifySettings = Settings::from_overlay(None)
        .unwrap()
        .section("classify")
        .unwrap();
    let model = keyword_model(&settings).unwrap();
    let classifier = Classifier::new(&settings).unwrap();
    let check = |text: &str, intent: &str, priority: Priority| {
        let guessed = model.classify(&[text]).remove(0);
        let classified = classifier.classify(message(text, Origin::User), guessed);
        assert_eq!(
            (classified.intent.name.as_str(), classified.priority),
            (intent, priority),
            "{text:?}"
        );
    };
    check("Hello there", "greeting", Priority::Normal);
    check("你好", "greeting", Priority::Normal);
    check("紧急：服务器宕机了", "outage_report", Priority::Urgent);
    check("the site is down", "outage_report", Priority::Urgent);
    check("I want a refund ASAP", "refund_request", Priority::Urgent);
    check("我要退款", "refund_request", Priority::Normal);
    check("where is my order?", "order_status", Priority::Normal);
    check("我忘记密码了", "account_password", Priority::Normal);
    check("谢谢！", "thanks", Priority::Normal);
    check("let me talk to a human", "human_agent", Priority::Normal);
    check("how much is the pro plan", "pricing", Priority::Normal);
    check("the weather is nice", "unknown", Priority::Normal);
    let announcement = classifier.classify(
        message(
            "紧急 maintenance tonight",
            Origin::Broadcast { id: "b".into() },
        ),
        model.classify(&["紧急 maintenance tonight"]).remove(0),
    );
    assert_eq!(
        announcement.priority,
        Priority::Batch,
        "announcements are batch whatever their words"
    );
    let audited = classifier.classify(
        message("this is shit, 傻逼", Origin::User),
        model.classify(&["x"]).remove(0),
    );
    assert_eq!(audited.audit, vec!["shit", "傻逼"]);
}
