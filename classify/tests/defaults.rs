//! The shipped rules, checked on the sentences they are meant for.

use botline_shared::config::Settings;
use botline_shared::message::{Origin, Priority, UnifiedMessage};
use botline_shared::testing::sample_message;
use classify::rules::IntentModel;
use classify::{keyword_model, Classifier, ClassifySettings};

fn message(text: &str, origin: Origin) -> UnifiedMessage {
    UnifiedMessage {
        origin,
        ..sample_message(0, text)
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

#[test]
fn the_embedding_model_without_its_files_stops_start_naming_the_fix() {
    let settings: ClassifySettings =
        Settings::from_overlay(Some("[classify]\nintent_model = \"embedding\"\n"))
            .unwrap()
            .section("classify")
            .unwrap();
    let error = classify::intent_model(&settings, std::path::Path::new("/nonexistent/e5"))
        .err()
        .expect("no model there")
        .to_string();
    for needle in [
        "BOTLINE_MODEL_PATH",
        "scripts/fetch-model",
        "/nonexistent/e5",
    ] {
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }
    // The keyword rules need no files.
    let keywords: ClassifySettings =
        Settings::from_overlay(Some("[classify]\nintent_model = \"keywords\"\n"))
            .unwrap()
            .section("classify")
            .unwrap();
    assert!(classify::intent_model(&keywords, std::path::Path::new("/nonexistent/e5")).is_ok());
}

#[test]
fn bad_model_settings_stop_start_naming_the_setting() {
    let check = |overlay: &str, setting: &str| {
        let error = Settings::from_overlay(Some(&format!("[classify]\n{overlay}\n")))
            .and_then(|settings| settings.section::<ClassifySettings>("classify"))
            .and_then(|settings| {
                classify::intent_model(&settings, std::path::Path::new("/nonexistent")).map(|_| ())
            })
            .expect_err(overlay)
            .to_string();
        assert!(error.contains(setting), "{setting:?} not in {error:?}");
    };
    check("embedding_mode = \"turbo\"", "classify.embedding_mode");
    check("intent_cache_size = -1", "classify.intent_cache_size");
    check(
        "cascade_min_margin = \"wide\"",
        "classify.cascade_min_margin",
    );
    check(
        "cascade_backlog_share = 1.5",
        "classify.cascade_backlog_share",
    );
}
