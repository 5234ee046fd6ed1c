-- Masks to review first, in the review worklist's order: the 50 least trusted films (`trust`:
-- the quality score together with how plainly the film shows the heart's width-setting
-- borders, where the model's score carries it; then by quality, the estimated mean Dice), with
-- the structure the score doubts most, group, CTR and the input check's verdict (quality 0:
-- the film does not read as a frontal chest radiograph).
SELECT uid, group_name, model, ROUND(CAST(trust AS NUMERIC), 3) AS trust, ROUND(CAST(quality AS NUMERIC), 3) AS quality,
       ROUND(CAST(quality_heart AS NUMERIC), 3) AS q_heart, ROUND(CAST(quality_left_lung AS NUMERIC), 3) AS q_left_lung,
       ROUND(CAST(quality_right_lung AS NUMERIC), 3) AS q_right_lung, ROUND(CAST(ctr AS NUMERIC), 3) AS ctr, view, input_check
FROM label_results
ORDER BY CASE WHEN trust IS NOT NULL THEN trust ELSE 1 + quality END ASC, uid
LIMIT 50;
